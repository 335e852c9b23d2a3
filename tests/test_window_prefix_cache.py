"""Sliding-window groups past the first forward (issue 21): a forward that continues rows attends
from their past window and its own K/V and stores only the window (inflight.py), so the prefix
cache's prefill holds a window, not the prompt; later prompts reuse the window snapshot a prefill
left where it stopped (prefill.py, prefix_cache.py), with stock's tokens."""

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.memory.prefix_cache import page_keys

from tiny import BASIC_MODES as MODES
from tiny import COMMON, left_padded
from tiny import generate as seeded_generate


def windowed_model(family: str, window: int, seed: int = 0) -> torch.nn.Module:
    """Gemma-3 shape (6 layers, 5 sliding : 1 full) or Mistral shape (4 layers, all sliding), one KV head of 32."""
    torch.manual_seed(seed)
    config_class, num_layers = {"gemma3": (transformers.Gemma3TextConfig, 6), "mistral": (transformers.MistralConfig, 4)}[family]
    config = config_class(
        hidden_size=64, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=window, **COMMON,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def generate(model, ids, mask, **kwargs):
    return seeded_generate(model, ids, mask, seed=7, max_new_tokens=6, **kwargs)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_few_shot_prompts_reuse_the_shared_prefix_and_match_stock(family):
    """Same 100-token prefix, other questions, window 8: the first batch's rows share the prefix's
    pages (one computes them), later calls hit them, in every decoding mode, padded batches too."""
    model = windowed_model(family, window=8)
    generator = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 128, (100,), generator=generator)
    prompts = [torch.cat([prefix, torch.randint(3, 128, (n,), generator=generator)]) for n in (30, 15, 22, 40)]
    calls = [left_padded(prompts[:2]), left_padded(prompts[2:3]), left_padded(prompts[3:]), left_padded(prompts[1:3])]
    expected = [{mode: generate(model, *call, **kw) for mode, kw in MODES.items()} for call in calls]
    paged = hf_paged.wrap(copy.deepcopy(model), num_pages=512, prefix_cache=True)
    key = paged.hf_paged_runtime.pool.prefix_cache.page_size
    for index, call in enumerate(calls):
        for mode, kw in MODES.items():
            before = hf_paged.memory_stats(paged)["prefix_hit_tokens"]
            assert torch.equal(generate(paged, *call, **kw), expected[index][mode]), (family, index, mode)
            hit = hf_paged.memory_stats(paged)["prefix_hit_tokens"] - before
            # Every prompt reuses the prefix's whole keys (the first batch's second row: from its first row).
            rows = len(call[0]) - (index == 0 and mode == "greedy")
            assert hit >= rows * (100 // key * key), (index, mode, hit)
    assert hf_paged.memory_stats(paged)["pages_in_use"] == hf_paged.memory_stats(paged)["cached_pages"]


def test_a_prefix_cache_prefill_holds_a_window_not_the_prompt():
    """A 400-token prompt, window 16: with the prefix cache, the pool peak is the one without it plus
    at most the snapshot's extra (a key's tokens in the sliding group, its two partial pages), and a
    second call hits the prompt's last key."""
    model = windowed_model("gemma3", window=16)
    ids = torch.randint(3, 128, (1, 400), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    expected = generate(model, ids, mask)
    peaks = []
    for cached in (False, True):
        paged = hf_paged.wrap(copy.deepcopy(model), num_pages=512, prefix_cache=cached)
        assert torch.equal(generate(paged, ids, mask), expected)
        peaks.append(hf_paged.memory_stats(paged)["peak_pages_in_use"])
    runtime = paged.hf_paged_runtime
    key = runtime.pool.prefix_cache.page_size
    sliding = [group.page_size for group in runtime.groups if group.window is not None][0]
    assert peaks[0] <= 400 // 16 + 2 + 16 // sliding + 3  # the full layer's prompt and a window
    assert peaks[1] <= peaks[0] + -(-key // sliding) + 1
    assert torch.equal(generate(paged, ids, mask), expected)
    stats = hf_paged.memory_stats(paged)
    assert stats["prefix_hit_tokens"] == 399 // key * key and stats["peak_pages_in_use"] <= peaks[1]


def test_a_users_chunked_prompt_stores_only_the_window_and_gives_stocks_logits():
    """A PagedCache fed a left-padded prompt in chunks longer than the window: each chunk's sliding
    layers read the rows' past window from the pages and their own K/V in flight."""
    model = windowed_model("gemma3", window=16)
    ids, mask = left_padded([torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (150, 131)])
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
    paged = hf_paged.wrap(copy.deepcopy(model), num_pages=256)
    pool = paged.hf_paged_runtime.pool
    for piece in pool.slices:  # stale NaN in every page (all bits set) but the zero page: never read
        piece[:, : pool.num_pages].fill_(255)
    cache = hf_paged.PagedCache(paged)
    logits = []
    with torch.no_grad():
        for start, end in ((0, 60), (60, 125), (125, 150)):
            positions = (mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end]
            out = paged(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions, past_key_values=cache)
            logits.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(logits, dim=1)[real], stock[real], rtol=1e-4, atol=1e-4)
    sliding = 1  # group index of the sliding layers (the full group comes first)
    size = cache.group_tables[sliding].page_size
    assert all(len(cache.group_tables[sliding].held(table)) <= 15 // size + 2 for table in cache.group_tables[sliding].page_tables)
    # Per row, the full layer's prompt and, while a chunk runs, the past window and the stored one
    # (not the chunk's 65 tokens).
    assert cache.pages.peak_pool_pages <= 2 * (150 // 16 + 1) + 2 * 2 * (15 // size + 2)
    cache.release()


def test_eviction_of_the_page_holding_a_hits_first_needed_token_ends_the_hit_there():
    """Mistral shape, window 6, keys of 4, sliding pages of 2, a pool of 4 pages. A 13-token prompt
    keeps its window snapshot at key 3 (tokens 7..11: pages 6..7, 8..9, 10..11); its forward at
    position 14 needs a fourth page while the row still holds 8..11, so the page of tokens 6..7
    (key 2's, out of the row's window) is evicted. Token 7 is the first the next query at key 3 sees: the same
    prompt again must compute everything (no hit), with stock's tokens."""
    model = windowed_model("mistral", window=6)
    ids = torch.randint(3, 128, (1, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    expected = seeded_generate(model, ids, mask, seed=7, max_new_tokens=8)
    paged = hf_paged.wrap(copy.deepcopy(model), num_pages=4, page_size=4, window_page_size=2, prefix_cache=True)
    prefix = paged.hf_paged_runtime.pool.prefix_cache
    keys = page_keys(ids[0].tolist(), 4, 3)

    first = seeded_generate(paged, ids, mask, seed=7, max_new_tokens=3)  # forwards at positions 0..11, 12, 13, 14
    assert torch.equal(first, expected[:, :16])
    stats = hf_paged.memory_stats(paged)
    assert stats["prefix_evictions"] == 1 and stats["cached_pages"] == 2
    hole = paged.hf_paged_runtime.pool.blocks.num_pages
    snapshot = prefix.pages_of.get(keys[2])
    assert keys[0] not in prefix.pages_of and keys[1] not in prefix.pages_of  # key 2's only page went
    assert snapshot is not None and hole not in snapshot[0]  # tokens 8..11 are still there

    assert torch.equal(seeded_generate(paged, ids, mask, seed=7, max_new_tokens=8), expected)
    assert hf_paged.memory_stats(paged)["prefix_hits"] == 0  # no key holds a whole window
