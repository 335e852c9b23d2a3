"""A row that computes a cached key's pages again leaves one copy of them (issue 34).

A kept entry whose sliding group holds no window snapshot where a prompt needs one is not used
(PrefixCache.match), so the row recomputes those tokens. Its batch's other rows then look the keys
up after it (prefill.py). If the entry kept its old pages, they adopted the old copy while the
computing row held its own: the call held the prefix twice and ran out of pages where one copy
fits (a false OutOfPagesError). The entry now takes the row's pages and gives the old ones back.
"""

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged import OutOfPagesError
from hf_paged.memory.blocks import BlockManager
from hf_paged.memory.prefix_cache import PrefixCache, entry_pages, page_keys

from tiny import COMMON, SMALL, left_padded

FULL, SLIDING = 0, 1
GROUPS = [(None, 2), (3, 1)]  # keys of 2 tokens: a full group with pages of 2, a window of 3 with pages of 1


def test_a_recomputed_key_takes_the_rows_pages_and_gives_the_old_ones_back():
    blocks = BlockManager(24)
    hole = blocks.num_pages
    prefix = PrefixCache(blocks, 2)
    tokens = list(range(10, 19))  # 9 tokens: 4 keys before the last one
    # A first row kept its 8 tokens: full pages 0..3, its window (tokens 6, 7) in sliding pages 4, 5.
    blocks.allocate(6)
    prefix.insert(tokens[:8], [[0, 1, 2, 3], [hole] * 6 + [4, 5]], [2, 1])
    blocks.free([0, 1, 2, 3, 4, 5])  # the call ends: the cache alone holds them
    shorter = tokens[:6] + [99, 98, 97]  # the same first 3 keys, then others: key 3's snapshot is not there
    assert prefix.match(shorter, groups=GROUPS) == []
    # So a row computes tokens 0..5 again: full pages 6, 7, 8, its window (tokens 4, 5) in 9, 10.
    assert blocks.allocate(5) == [6, 7, 8, 9, 10]
    prefix.insert(shorter[:6], [[6, 7, 8], [hole] * 4 + [9, 10]], [2, 1])
    keys = page_keys(tokens, 2, 4)
    assert [prefix.pages_of[key] for key in keys] == [((6,), (hole, hole)), ((7,), (hole, hole)), ((8,), (9, 10)), ((3,), (4, 5))]
    assert [blocks.ref_counts[page] for page in range(11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert sorted(prefix.key_of) == [3, 4, 5, 6, 7, 8, 9, 10]
    # Another row of the batch, looking the keys up now, finds the computing row's pages.
    assert prefix.match(shorter[:6] + [50, 51], groups=GROUPS) == [((6,), (hole, hole)), ((7,), (hole, hole)), ((8,), (9, 10))]


# Prompts: one of three prefixes (a small alphabet, so chains meet), cut anywhere, then a suffix.
prompt = st.tuples(st.integers(0, 2), st.integers(1, 12), st.lists(st.integers(0, 2), max_size=5))
step = st.one_of(
    st.tuples(st.just("row"), prompt),  # a row looks its prompt up, adopts the hits, computes the rest, keeps it
    st.tuples(st.just("release"), st.integers(0, 10)),  # a live row ends
    st.tuples(st.just("evict"), st.integers(1, 8)),  # an allocation elsewhere asks the cache for pages
)
PREFIXES = [[1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2], [1, 2, 1, 2, 2, 2, 2, 1, 1, 1, 2, 1], [2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1]]


def compute_row(blocks: BlockManager, prefix: PrefixCache, tokens: list[int]) -> list[list[int]] | None:
    """A row as prefill.py makes one: the hits adopted, its other full pages and its window computed
    (new pages), everything before the window a hole; kept in the cache. None if the pool is short."""
    hole, window = blocks.num_pages, GROUPS[SLIDING][0]
    hits = prefix.match(tokens, groups=GROUPS)
    full = [page for entry in hits for page in entry[FULL]]
    sliding = [page for entry in hits for page in entry[SLIDING]]
    num_full = -(-len(tokens) // 2)
    first_held = max(0, len(tokens) - window + 1)  # the window the next query sees
    adopted = [page for page in full + sliding[first_held:] if page != hole]
    blocks.fork(adopted)
    try:
        full += blocks.allocate(num_full - len(full))
        fresh = blocks.allocate(len(tokens) - max(len(sliding), first_held))
    except OutOfPagesError:
        blocks.free(adopted + [page for page in full if page not in adopted])
        return None
    sliding = [hole] * first_held + sliding[first_held:] + fresh
    sliding = sliding[: len(tokens)]
    prefix.insert(tokens, [full, sliding], [2, 1])
    return [full, sliding]


def check(blocks: BlockManager, prefix: PrefixCache, rows: list[list[list[int]]]) -> None:
    hole = blocks.num_pages
    holders = [0] * blocks.num_pages
    for tables in rows:
        for table in tables:
            for page in table:
                if page != hole:
                    holders[page] += 1
    for page in prefix.key_of:
        holders[page] += 1
    assert blocks.ref_counts == holders  # one reference per holder: no leak, no page freed while held
    for key, entry in prefix.pages_of.items():  # a cached page sits in one entry, under its key
        pages = entry_pages(entry, hole)
        assert pages and all(prefix.key_of[page] == key for page in pages)
    assert len(prefix.key_of) == sum(len(entry_pages(entry, hole)) for entry in prefix.pages_of.values())


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=30))
def test_rows_and_evictions_keep_one_copy_of_every_key_they_compute(steps):
    blocks = BlockManager(40)
    hole = blocks.num_pages
    prefix = PrefixCache(blocks, 2)
    rows: list[tuple[list[int], list[list[int]]]] = []
    for kind, value in steps:
        if kind == "row":
            which, cut, suffix = value
            tokens = PREFIXES[which][:cut] + suffix
            tables = compute_row(blocks, prefix, tokens)
            if tables is None:
                continue
            rows.append((tokens, tables))
            # What the row holds is what the cache holds for its keys: a later row of its batch adopts it.
            for index, key in enumerate(page_keys(tokens, 2, len(tokens) // 2)):
                entry = prefix.pages_of[key]
                assert entry[FULL] == (tables[FULL][index],)
                for mine, kept in zip(tables[SLIDING][2 * index : 2 * index + 2], entry[SLIDING]):
                    assert mine == hole or mine == kept
        elif kind == "release" and rows:
            _, tables = rows.pop(value % len(rows))
            blocks.free([page for table in tables for page in table if page != hole])
        elif kind == "evict":
            evictable = prefix.num_evictable()
            freed = prefix.evict(value)
            assert freed >= min(value, evictable) and prefix.num_evictable() == evictable - freed
        check(blocks, prefix, [tables for _, tables in rows])
    for _, tables in rows:
        blocks.free([page for table in tables for page in table if page != hole])
    cached = prefix.num_cached_pages
    assert prefix.evict(blocks.num_pages) == cached and prefix.num_cached_pages == 0  # all evictable now
    assert blocks.num_free_pages == blocks.num_pages


def gemma2(window: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=window, **COMMON)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_batch_that_recomputes_a_cached_prefix_fits_where_a_fresh_pool_does():
    """Gemma-2, window 6, pages of 2, 59 pages. The first call keeps a 34-token prompt; the second
    brings three prompts that share its first 29 tokens, where no window snapshot was kept: one row
    recomputes the 28 shared tokens and the others adopt its pages (before: the cached copy, 14 pages
    more, and 'needed 14 pages, 8 of 59 free' at the first decode step)."""
    model = gemma2(window=6)
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 128, (29,), generator=generator)
    first = [torch.cat([shared, torch.randint(3, 128, (5,), generator=generator)])]
    second = [torch.cat([shared, torch.randint(3, 128, (n,), generator=generator)]) for n in (9, 12, 5)]
    settings_first = dict(num_beams=2, max_new_tokens=2, min_new_tokens=2, pad_token_id=0)
    settings_second = dict(num_beams=3, num_return_sequences=2, max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    expected = model.generate(*left_padded(second)[:1], attention_mask=left_padded(second)[1], **settings_second)
    fresh = hf_paged.wrap(copy.deepcopy(model), page_size=2, num_pages=59, prefix_cache=True)
    assert torch.equal(fresh.generate(left_padded(second)[0], attention_mask=left_padded(second)[1], **settings_second), expected)
    fresh_peak = hf_paged.memory_stats(fresh)["peak_pages_in_use"]
    warm = hf_paged.wrap(copy.deepcopy(model), page_size=2, num_pages=59, prefix_cache=True)
    warm.generate(left_padded(first)[0], attention_mask=left_padded(first)[1], **settings_first)
    stats = hf_paged.memory_stats(warm)
    assert stats["pages_in_use"] == stats["cached_pages"] > 0
    ids, mask = left_padded(second)
    assert torch.equal(warm.generate(ids, attention_mask=mask, **settings_second), expected)
    stats = hf_paged.memory_stats(warm)
    assert stats["peak_pages_in_use"] <= fresh_peak and stats["pages_in_use"] == stats["cached_pages"]
    assert warm.hf_paged_runtime.pool.prefix_cache.num_evictable() == stats["cached_pages"]
