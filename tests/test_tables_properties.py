"""Property tests: random append/fork/reorder/crop/release sequences keep the page invariants."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged import OutOfPagesError
from hf_paged.memory.blocks import BlockManager
from hf_paged.memory.reservations import num_pages_for
from hf_paged.memory.tables import PageTables

operation = st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, 7), min_size=1, max_size=8)),
    st.tuples(st.just("select"), st.lists(st.integers(0, 100), min_size=1, max_size=8)),
    st.tuples(st.just("crop"), st.integers(0, 6)),
    st.tuples(st.just("release"), st.none()),
    st.tuples(st.just("reserve"), st.integers(0, 12)),  # release, then reserve runs of this many tokens
    st.tuples(st.just("other"), st.integers(1, 5)),  # another cache takes pages (maybe reserved ones)
    st.tuples(st.just("drop"), st.none()),  # a sliding window lets go of the pages no query can see
)


def stored_slots(tables: PageTables) -> set[tuple[int, int]]:
    """(page, slot) of every token the rows hold, counted token by token (not by PageTables)."""
    page_size = tables.page_size
    return {
        (table[position // page_size], position % page_size)
        for table, num_tokens in zip(tables.page_tables, tables.num_tokens)
        for position in range(num_tokens)
        if table[position // page_size] != tables.hole
    }


def has_free_run(free_pages: set[int], length: int, num_pages: int) -> bool:
    """Whether `length` consecutive page ids are all free."""
    return any(all(page in free_pages for page in range(start, start + length)) for start in range(num_pages - length + 1))


def check_invariants(blocks: BlockManager, tables: PageTables, other: PageTables) -> None:
    holders = Counter(page for t in (tables, other) for table in t.page_tables for page in t.held(table))
    for page in range(blocks.num_pages):
        assert blocks.ref_counts[page] == holders.get(page, 0), f"page {page}"
    assert blocks.num_free_pages + len(holders) == blocks.num_pages
    assert not set(blocks.free_page_ids) & set(holders), "a free page is still referenced"
    assert len(set(blocks.free_page_ids)) == len(blocks.free_page_ids)
    assert blocks.num_shared_pages == sum(1 for count in holders.values() if count > 1)
    assert [page for page in range(blocks.num_pages) if blocks._free_flags[page]] == sorted(blocks.free_page_ids)
    assert all(blocks._stack_index[page] == i for i, page in enumerate(blocks.free_page_ids))
    for row, table in enumerate(tables.page_tables):  # a row still reserving holds its reserved pages, in order
        if tables.home[row] >= 0:  # (a window's released pages, at the front, are holes)
            lead = tables.num_leading_holes[row]
            assert table[lead:] == list(range(tables.home[row] + lead, tables.home[row] + len(table)))
    for table, num_tokens, lead in zip(tables.page_tables, tables.num_tokens, tables.num_leading_holes):
        assert len(table) == num_pages_for(num_tokens, tables.page_size)
        assert len(set(tables.held(table))) == len(tables.held(table))
        # Windows release from the front: holes exactly where the row's count says, nowhere else.
        assert table[:lead] == [tables.hole] * lead and tables.hole not in table[lead:]
        if tables.window is not None and num_tokens:  # the next query's keys are all held
            first_needed = max(0, num_tokens - tables.window + 1) // tables.page_size
            assert lead <= first_needed
    # Memory bound: pages in use <= pages for the unique tokens + one partial page per row.
    bound = num_pages_for(len(stored_slots(tables)), tables.page_size) + tables.num_rows
    assert blocks.num_used_pages - len(set(p for t in other.page_tables for p in t)) <= bound


@settings(max_examples=150, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 3, 4]),
    num_pages=st.integers(4, 40),
    num_rows=st.integers(1, 4),
    window=st.sampled_from([None, 2, 3, 5]),
    operations=st.lists(operation, max_size=25),
)
def test_random_operations_keep_invariants(page_size, num_pages, num_rows, window, operations):
    blocks = BlockManager(num_pages)
    tables = PageTables(blocks, page_size, window)
    tables.add_rows(num_rows)
    other = PageTables(blocks, page_size)
    other.add_rows(1)
    for name, argument in operations:
        if name == "append":
            counts = (argument * tables.num_rows)[: tables.num_rows]
            before = ([list(t) for t in tables.page_tables], list(blocks.free_page_ids), list(blocks.ref_counts))
            try:
                slots, copies = tables.append(counts)
            except OutOfPagesError:
                after = ([list(t) for t in tables.page_tables], list(blocks.free_page_ids), list(blocks.ref_counts))
                assert after == before, "a failed append changed state"
            else:
                assert len(slots) == sum(counts) and len(set(slots)) == len(slots)
                assert all(blocks.ref_counts[dst] == 1 for _, dst in copies)
                # Copy-on-write: a row only ever writes into a page no other row holds.
                assert all(blocks.ref_counts[slot // page_size] == 1 for slot in slots)
        elif name == "select" and tables.num_rows:
            tables.select_rows([i % tables.num_rows for i in argument])
        elif name == "crop":
            before = ([list(t) for t in tables.page_tables], list(tables.num_tokens), list(blocks.ref_counts))
            try:
                tables.crop([argument] * tables.num_rows)
            except ValueError:  # it would need pages the window released
                after = ([list(t) for t in tables.page_tables], list(tables.num_tokens), list(blocks.ref_counts))
                assert after == before, "a refused crop changed state"
        elif name == "drop":
            tables.drop_out_of_window()
        elif name == "release":
            tables.release()
            tables.add_rows(num_rows)
        elif name == "reserve":
            tables.release()
            tables.add_rows(num_rows)
            stride = -(-argument // page_size)
            run_exists = has_free_run(set(blocks.free_page_ids), num_rows * stride, num_pages)
            reserved = tables.reserve(argument)
            assert reserved == (stride > 0 and run_exists)
            assert (min(tables.home) >= 0) == reserved
        elif name == "other":
            try:
                other.append([argument])
            except OutOfPagesError:
                pass
        check_invariants(blocks, tables, other)
    tables.release()
    other.release()
    assert blocks.num_free_pages == num_pages
