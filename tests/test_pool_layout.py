"""The pool's shape (layout.py): one id space, an id's bytes the same whichever group holds it, and
`memory_stats`' pool peak checked against that geometry."""

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.errors import OutOfPagesError
from hf_paged.integration.stats import cache_kv_bytes

from tiny import COMMON


def one_kv_head_of_32(config_class, num_layers: int, window: int, seed: int) -> torch.nn.Module:
    """A tiny model of issue 21's measured shapes: one KV head of 32, hidden 64, sliding window `window`."""
    torch.manual_seed(seed)
    config = config_class(
        hidden_size=64, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=window, **COMMON,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def gemma3_shape(window: int = 8, seed: int = 0) -> torch.nn.Module:
    """6 layers, 5 sliding : 1 full."""
    return one_kv_head_of_32(transformers.Gemma3TextConfig, 6, window, seed)


def test_sliding_layers_pack_into_the_full_layers_pages():
    model = hf_paged.wrap(gemma3_shape(window=96), num_pages=32)
    pool = model.hf_paged_runtime.pool
    token_bytes = 2 * 1 * 32 * 4  # keys and values, one head of 32, fp32
    # Five sliding layers share one full layer's page of 16 tokens: pages of 3 tokens (15 of 16 slots).
    assert [(g.window, g.page_size) for g in model.hf_paged_runtime.groups] == [(None, 16), (96, 3)]
    assert pool.page_bytes == 16 * token_bytes
    assert pool.pool_bytes == 32 * pool.page_bytes
    assert sum(piece.nbytes for piece in pool.slices) == 33 * pool.page_bytes  # and the zero page
    stats = hf_paged.memory_stats(model)
    assert [(g["page_size"], g["page_bytes"]) for g in stats["groups"]] == [(16, 16 * token_bytes), (3, 15 * token_bytes)]
    # Each sliding layer has its own 3 token slots of every id, none overlapping another's.
    base = pool.slices[0].data_ptr()
    starts = sorted(pool.pools[layer].data_ptr() - base for layer in range(5))
    assert starts == [i * 3 * token_bytes // 2 for i in range(5)]
    assert pool.pools[5].is_contiguous() and pool.pools[5].data_ptr() == base
    # The prefix cache keys entries by whole pages of every group: 48 tokens, 3 full pages and 16 sliding ones.
    cached = hf_paged.wrap(gemma3_shape(window=96), num_pages=32, prefix_cache=True)
    assert [g.page_size for g in cached.hf_paged_runtime.groups] == [16, 3]
    assert cached.hf_paged_runtime.pool.prefix_cache.page_size == 48


def test_models_without_windows_keep_one_contiguous_pool_per_layer():
    model = hf_paged.wrap(gemma3_shape(), num_pages=16, compile=True)  # one group
    pool = model.hf_paged_runtime.pool
    assert all(layer_pool.is_contiguous() for layer_pool in pool.pools)
    assert pool.page_bytes == 6 * 16 * 2 * 32 * 4


def test_a_pool_of_its_peak_pages_serves_the_call_and_one_fewer_does_not():
    """The pool peak is counted inside forwards: a pool of exactly that many pages serves the same
    call, one page fewer runs out."""
    model = gemma3_shape()
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, pad_token_id=0, num_beams=3)
    expected = model.generate(ids, **kwargs)
    paged = hf_paged.wrap(copy.deepcopy(model), num_pages=512)
    assert torch.equal(paged.generate(ids, **kwargs), expected)
    stats = hf_paged.memory_stats(paged)
    peak = stats["peak_pages_in_use"]
    assert stats["peak_pool_bytes"] == peak * stats["page_bytes"] and 0 < peak < 512
    hf_paged.wrap(paged, num_pages=peak)
    assert torch.equal(paged.generate(ids, **kwargs), expected)
    assert hf_paged.memory_stats(paged)["peak_pool_bytes"] == stats["peak_pool_bytes"] == hf_paged.memory_stats(paged)["pool_bytes"]
    hf_paged.wrap(paged, num_pages=peak - 1)
    with pytest.raises(OutOfPagesError):
        paged.generate(ids, **kwargs)
    assert hf_paged.memory_stats(paged)["pages_in_use"] == 0


def mistral_shape(window: int = 200, seed: int = 0) -> torch.nn.Module:
    """4 layers, all sliding."""
    return one_kv_head_of_32(transformers.MistralConfig, 4, window, seed)


def serve_in_a_fraction_of_stock(model, prompt: int, fraction: float, prefix_cache: bool = False, **kwargs) -> dict:
    """Stock's tokens from a pool of `fraction` x the KV bytes stock's cache ends with (the budget
    given as bytes); returns memory_stats."""
    ids = torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, pad_token_id=0, **kwargs)
    stock = model.generate(ids, return_dict_in_generate=True, **kwargs)
    stock_bytes = cache_kv_bytes(stock.past_key_values)
    paged = hf_paged.wrap(copy.deepcopy(model), max_memory=int(fraction * stock_bytes), prefix_cache=prefix_cache)
    assert torch.equal(paged.generate(ids, **kwargs), stock.sequences)  # and no OutOfPagesError
    stats = hf_paged.memory_stats(paged)
    assert stats["peak_pool_bytes"] <= stats["pool_bytes"] <= fraction * stock_bytes
    assert stats["pages_in_use"] == stats.get("cached_pages", 0)
    return stats


@pytest.mark.parametrize(
    "make, prompt, fraction, kwargs",
    [
        (gemma3_shape, 900, 1.1, {}),
        (gemma3_shape, 900, 0.40, dict(num_beams=4)),
        (mistral_shape, 900, 0.45, dict(num_beams=4)),
        (gemma3_shape, 900, 1.1, dict(prefix_cache=True)),
        (mistral_shape, 900, 0.45, dict(num_beams=4, prefix_cache=True)),
        pytest.param(gemma3_shape, 3000, 1.1, {}, marks=pytest.mark.slow),
    ],
    ids=["gemma3-greedy-1.1x", "gemma3-beam4-0.40x", "mistral-beam4-0.45x", "gemma3-prefix-cache-1.1x",
         "mistral-beam4-prefix-cache-0.45x", "gemma3-3000-1.1x"],
)
def test_windowed_models_fit_in_a_fraction_of_stocks_kv_bytes(make, prompt, fraction, kwargs):
    """Windows of 96 (Gemma-3 shape) and 200 (Mistral shape) and a prompt of 900 or 3,000 tokens:
    the prompt's forward stores only each sliding layer's last window (inflight.py), and the
    sliding layers' pages pack into the full layer's page ids (layout.py)."""
    window = 200 if make is mistral_shape else 96
    serve_in_a_fraction_of_stock(make(window=window), prompt, fraction, **kwargs)
