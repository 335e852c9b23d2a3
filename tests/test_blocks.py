"""BlockManager and PageTables: exact page ids, free-list order, copy-on-write, check-before-mutate."""

import pytest

from hf_paged import OutOfPagesError
from hf_paged.memory.blocks import BlockManager
from hf_paged.memory.reservations import consecutive_run
from hf_paged.memory.tables import PageTables


def test_allocate_hands_out_low_ids_first_and_free_returns_tail_first():
    blocks = BlockManager(6)
    assert blocks.allocate(3) == [0, 1, 2]
    assert blocks.allocate(2) == [3, 4]
    blocks.free([0, 1, 2])  # tail first: 2, 1, 0 go back, 0 ends on top
    assert blocks.free_page_ids == [5, 2, 1, 0]
    assert blocks.allocate(2) == [0, 1]
    assert blocks.num_used_pages == 4 and blocks.num_free_pages == 2


def test_fork_and_free_count_references_and_shared_pages():
    blocks = BlockManager(4)
    pages = blocks.allocate(2)
    blocks.fork(pages)
    blocks.fork(pages[:1])
    assert blocks.ref_counts[:2] == [3, 2] and blocks.num_shared_pages == 2
    blocks.free(pages)
    assert blocks.ref_counts[:2] == [2, 1] and blocks.num_shared_pages == 1
    blocks.free(pages)
    assert blocks.ref_counts[:2] == [1, 0] and blocks.free_page_ids[-1] == 1


def test_out_of_pages_raises_before_changing_anything():
    blocks = BlockManager(3)
    blocks.allocate(2)
    before = (list(blocks.free_page_ids), list(blocks.ref_counts))
    with pytest.raises(OutOfPagesError, match="needed 2 pages, 1 of 3 free"):
        blocks.allocate(2)
    assert (blocks.free_page_ids, blocks.ref_counts) == before


def test_double_free_and_sharing_a_free_page_are_refused():
    blocks = BlockManager(2)
    (page,) = blocks.allocate(1)
    blocks.free([page])
    with pytest.raises(ValueError, match="already free"):
        blocks.free([page])
    with pytest.raises(ValueError, match="is free"):
        blocks.fork([page])


def test_append_fills_pages_and_returns_slots():
    tables = PageTables(BlockManager(8), page_size=4)
    tables.add_rows(2)
    slots, copies = tables.append([5, 2])
    assert tables.page_tables == [[0, 1], [2]]
    assert slots == [0, 1, 2, 3, 4, 8, 9] and copies == []
    slots, _ = tables.append([1, 3])
    assert tables.page_tables == [[0, 1], [2, 3]]
    assert slots == [5, 10, 11, 12]


def test_fork_then_append_copies_the_shared_partial_page_once_per_writer_but_the_last():
    blocks = BlockManager(16)
    tables = PageTables(blocks, page_size=4)
    tables.add_rows(1)
    tables.append([6])  # pages [0, 1], page 1 half full
    tables.select_rows([0, 0, 0])
    assert blocks.ref_counts[:2] == [3, 3]
    assert tables.num_pages_to_append([1, 1, 1]) == 2
    slots, copies = tables.append([1, 1, 1])
    assert copies == [(1, 2), (1, 3)]  # rows 0 and 1 copy; row 2 writes in place
    assert tables.page_tables == [[0, 2], [0, 3], [0, 1]]
    assert slots == [2 * 4 + 2, 3 * 4 + 2, 1 * 4 + 2]
    assert blocks.ref_counts[:4] == [3, 1, 1, 1]


def test_append_that_does_not_fit_changes_nothing():
    blocks = BlockManager(3)
    tables = PageTables(blocks, page_size=2)
    tables.add_rows(2)
    tables.append([2, 1])
    state = ([list(t) for t in tables.page_tables], list(tables.num_tokens), list(blocks.free_page_ids))
    with pytest.raises(OutOfPagesError, match="needed 3 pages, 1 of 3 free"):
        tables.append([3, 2])
    assert ([list(t) for t in tables.page_tables], list(tables.num_tokens), list(blocks.free_page_ids)) == state


def test_select_rows_reorders_drops_and_frees_unreferenced_pages():
    blocks = BlockManager(8)
    tables = PageTables(blocks, page_size=2)
    tables.add_rows(3)
    tables.append([3, 2, 1])  # [[0, 1], [2], [3]]
    tables.select_rows([1, 1, 0])
    assert tables.page_tables == [[2], [2], [0, 1]]
    assert tables.num_tokens == [2, 2, 3]
    assert blocks.ref_counts[:4] == [1, 1, 2, 0]
    assert blocks.free_page_ids[-1] == 3


def test_crop_releases_pages_past_the_new_end():
    blocks = BlockManager(8)
    tables = PageTables(blocks, page_size=4)
    tables.add_rows(2)
    tables.append([9, 3])  # [[0, 1, 2], [3]]
    tables.crop([5, 2])
    assert tables.page_tables == [[0], [3]] and tables.num_tokens == [4, 1]
    assert blocks.free_page_ids[-2:] == [2, 1]


def test_release_returns_every_page():
    blocks = BlockManager(8)
    tables = PageTables(blocks, page_size=2)
    tables.add_rows(2)
    tables.append([3, 4])
    tables.select_rows([0, 1, 1])
    tables.release()
    assert blocks.num_free_pages == 8 and all(count == 0 for count in blocks.ref_counts)


# -- reservations: consecutive pages for rows that share nothing ---------------------------------


def test_take_removes_one_page_from_anywhere_in_the_free_stack():
    blocks = BlockManager(6)
    assert blocks.take(3) and blocks.ref_counts[3] == 1
    assert not blocks.take(3)  # in use: refused, nothing changes
    assert blocks.free_page_ids == [5, 4, 0, 2, 1] and blocks.num_used_pages == 1
    assert blocks.allocate(4) == [1, 2, 0, 4]
    blocks.free([3])
    assert blocks.free_page_ids == [5, 3]


def test_find_free_run_returns_the_lowest_run_of_free_pages():
    blocks = BlockManager(8)
    blocks.allocate(2)  # 0, 1
    assert blocks.take(4)
    assert blocks.find_free_run(2) == 2 and blocks.find_free_run(3) == 5
    assert blocks.find_free_run(4) is None and blocks.find_free_run(0) is None
    blocks.free([4])
    assert blocks.find_free_run(6) == 2


def test_reserved_rows_take_consecutive_pages_at_a_fixed_stride():
    blocks = BlockManager(16)
    blocks.allocate(1)  # page 0 is held elsewhere: the run starts at 1
    tables = PageTables(blocks, page_size=2)
    tables.add_rows(3)
    assert tables.reserve(5)  # 3 pages per row
    slots, _ = tables.append([3, 3, 3])
    assert tables.page_tables == [[1, 2], [4, 5], [7, 8]]
    assert slots == [2, 3, 4, 8, 9, 10, 14, 15, 16]
    assert consecutive_run(tables.page_tables, blocks.num_pages) == (1, 3)
    tables.append([2, 2, 2])  # the third page of each run
    assert tables.page_tables == [[1, 2, 3], [4, 5, 6], [7, 8, 9]] and consecutive_run(tables.page_tables, blocks.num_pages) == (1, 3)
    tables.append([2, 0, 0])  # row 0 outgrows its run: an ordinary page, and the view is gone
    assert tables.page_tables[0] == [1, 2, 3, 10] and consecutive_run(tables.page_tables, blocks.num_pages) is None
    tables.release()
    assert blocks.num_used_pages == 1


def test_a_reserved_page_held_elsewhere_is_allocated_elsewhere():
    blocks = BlockManager(12)
    tables = PageTables(blocks, page_size=1)
    tables.add_rows(2)
    assert tables.reserve(3)  # row 0: pages 0-2, row 1: pages 3-5
    tables.append([1, 1])
    assert blocks.take(4)  # another cache takes row 1's next page
    slots, _ = tables.append([1, 1])
    # Row 1 leaves its run (its own page 5 is free again); the free stack passes over page 2,
    # which row 0's run still counts on (a reserved page is handed out last).
    assert tables.page_tables == [[0, 1], [3, 5]] and slots == [1, 5]
    assert tables.home == [0, -1] and consecutive_run(tables.page_tables, blocks.num_pages) is None
    tables.append([1, 0])
    assert tables.page_tables[0] == [0, 1, 2]


def test_reserve_refuses_without_a_free_run_or_with_tokens_held():
    blocks = BlockManager(6)
    tables = PageTables(blocks, page_size=4)
    tables.add_rows(2)
    assert not tables.reserve(13)  # 2 rows x 4 pages > 6
    assert tables.home == [-1, -1]
    tables.append([1, 1])
    assert not tables.reserve(4)
    tables.release()
    tables.add_rows(2)
    assert tables.reserve(12) and tables.home == [0, 3]


def test_shared_rows_end_the_reservation():
    blocks = BlockManager(12)
    tables = PageTables(blocks, page_size=2)
    tables.add_rows(2)
    assert tables.reserve(4)
    tables.append([3, 3])
    tables.select_rows([1, 0])
    assert consecutive_run(tables.page_tables, blocks.num_pages) is None and tables.home == [-1, -1]
    tables.append([1, 1])  # fills each row's own partial last page; nothing shared, nothing copied
    assert tables.page_tables == [[2, 3], [0, 1]]


def test_consecutive_run_finds_lists_that_are_one_strided_view():
    assert consecutive_run([[4, 5], [7, 8]], 99) == (4, 3)
    assert consecutive_run([[97, 98]], 99) == (97, 2)
    assert consecutive_run([[4, 5], [6, 8]], 99) is None  # not consecutive
    assert consecutive_run([[4, 5], [5, 6]], 99) is None  # overlapping runs
    assert consecutive_run([[4, 5], [7]], 99) is None  # lengths differ
    assert consecutive_run([[6, 7], [8, 9]], 9) is None  # past the last page
    assert consecutive_run([[]], 9) is None and consecutive_run([], 9) is None
