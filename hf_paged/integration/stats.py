"""memory_stats: what the page pool of a wrapped model holds, now and at its peak."""

import torch

from ..cache.runtime import runtime_of


def memory_stats(model: torch.nn.Module) -> dict:
    """Pool geometry and occupancy of a wrapped model.

    Geometry: `num_pages` page ids of `page_bytes` each (every layer's share of an id, keys and
    values, whichever group of layers holds it: layout.py), `pool_bytes` in all (the pool tensors
    hold one more, zero, page).

    `peak_pages_in_use` and `peak_shared_pages` (pages held by more than one row) are those of
    the generate() call that finished last, counted by its own cache: pages that concurrent calls
    held meanwhile are not included. `peak_pages_in_use` counts the ids all groups of layers held at
    one instant, inside forwards too (a forward holds its pages while its layers run), and
    `peak_pool_bytes` is what they reserve: `peak_pages_in_use * page_bytes`, the smallest pool
    that call fits in. `pages_in_use` is the whole pool's, now. `*_bytes` count keys and values of
    all layers.

    `groups` lists each group of layers (groups.py: full attention, or one sliding window) with its
    page size (sliding groups take smaller pages), the bytes of an id its layers use
    (`page_bytes`, at most the pool's) and the pages its rows held after a forward at the peak of
    the last call; when a group has a sliding window, `peak_kv_bytes` is what the rows held after
    each forward (a window lets go of what it cannot see at the end of a forward, the measure of
    stock's window-only cache), each group's pages at the bytes its layers use; otherwise it
    equals `peak_pool_bytes`. With the prefix cache on, `pages_in_use` includes the
    `cached_pages` it keeps between calls (a call's peaks count the pages its rows hold, cached
    ones they read included, not those only the cache holds), and `prefix_*` count looked-up tokens, hit pages, hit tokens and evicted pages since wrap().

    An encoder-decoder model (docs/seq2seq.md) has two groups: the decoder's self-attention (its
    rows' pages) and its cross-attention (`"cross_attention": True`: pages per input, written once);
    `peak_self_attention_pages` and `peak_cross_attention_pages` are their peaks after a forward,
    and `peak_pages_in_use` counts both.

    `returned_caches` counts the caches generate() returned in its output (`return_dict_in_generate=
    True`) that are still open, and `returned_cache_pages` the page ids they hold: they keep their
    pages, as stock's returned cache keeps its tensors, until dropped or `cache.release()`d.

    `kv_cache_dtype` is what pages store (PagedConfig's: "auto", "fp8_e4m3", "fp8_e5m2") and
    `kv_dtype` that dtype's torch name. With fp8 pages, `kv_scales` lists each layer's (k_scale,
    v_scale) (None until its first forward sets it) and `kv_clamped_values` the keys and values
    clamped to the fp8 range since wrap() (docs/fp8.md).

    Under tensor parallelism (`tp_size > 1`) the figures are those of this rank's pool (`tp_rank`),
    which holds this rank's KV heads; every rank's pool has the same pages.
    """
    runtime = runtime_of(model, "memory_stats")
    pool = runtime.pool
    pool.reclaim_dropped()  # caches collected unreleased give their pages back first
    blocks = pool.blocks
    stats = {
        "page_size": pool.page_size,
        "num_pages": pool.num_pages,
        "page_bytes": pool.page_bytes,
        "pool_bytes": pool.pool_bytes,
        "pages_in_use": blocks.num_used_pages,
        "shared_pages": blocks.num_shared_pages,
        "peak_pages_in_use": runtime.last_peak_pages,
        "peak_shared_pages": runtime.last_peak_shared_pages,
        "peak_pool_bytes": runtime.last_peak_pages * pool.page_bytes,
        "peak_kv_bytes": runtime.last_peak_pages * pool.page_bytes,
        "kv_cache_dtype": runtime.config.kv_cache_dtype,
        "kv_dtype": str(pool.specs[0].storage_dtype).removeprefix("torch.") if pool.specs else None,
        # Under tensor parallelism every figure is this rank's pool (its local KV heads); each rank has one.
        "tp_rank": runtime.tp.rank if runtime.tp is not None else 0,
        "tp_size": runtime.tp.size if runtime.tp is not None else 1,
    }
    with blocks.lock:  # caches generate() returned (return_dict_in_generate=True), not yet dropped or released
        returned = [cache for cache in list(pool.returned_caches) if not cache.is_released]
        stats["returned_caches"] = len(returned)
        stats["returned_cache_pages"] = len(set().union(*(cache.held_page_ids() for cache in returned)))
    if any(group.window is not None for group in runtime.groups):
        # Counted by the cache after each forward (a sliding group has let go of what it cannot see),
        # each group's pages at the bytes its layers use.
        stats["peak_kv_bytes"] = runtime.last_peak_kv_bytes
    stats["groups"] = [
        {
            "window": group.window,
            "num_layers": len(group.layers),
            "page_size": group.page_size,
            "page_bytes": pool.layer_bytes(group.layers),
            "peak_pages_in_use": peaks[index] if index < len(peaks) else 0,
            **({"cross_attention": True} if group.cross else {}),
        }
        for index, group in enumerate(runtime.groups)
        for peaks in [runtime.last_peak_group_pages]
    ]
    if any(group.cross for group in runtime.groups):  # an encoder-decoder model: the two kinds apart
        stats["peak_cross_attention_pages"] = sum(g["peak_pages_in_use"] for g in stats["groups"] if g.get("cross_attention"))
        stats["peak_self_attention_pages"] = sum(g["peak_pages_in_use"] for g in stats["groups"] if not g.get("cross_attention"))
    if pool.kv_quant is not None:  # fp8 pages (memory/kv_quant.py)
        stats.update(kv_scales=list(pool.kv_quant.scales), kv_clamped_values=pool.kv_quant.clamped_values())
    prefix = pool.prefix_cache
    if prefix is not None:  # PagedConfig(prefix_cache=True): counters since wrap()
        stats.update(
            cached_pages=prefix.num_cached_pages,
            prefix_lookup_tokens=prefix.stats.lookup_tokens,
            prefix_hits=prefix.stats.hits,
            prefix_hit_tokens=prefix.stats.hit_tokens,
            prefix_evictions=prefix.stats.evictions,
        )
    return stats


def clear_prefix_cache(model: torch.nn.Module) -> None:
    """Empty the prefix cache of a wrapped model (`PagedConfig(prefix_cache=True)`): its pages
    return to the pool. A no-op when the cache is off."""
    runtime = runtime_of(model, "clear_prefix_cache")
    if runtime.pool.prefix_cache is not None:
        with runtime.pool.blocks.lock:
            runtime.pool.prefix_cache.clear()


def cache_kv_bytes(cache: object) -> int:
    """Bytes of keys and values a transformers cache (a stock DynamicCache) holds now.

    The one definition of "stock KV bytes" that scripts/eval.py and scripts/bench.py report next
    to `peak_kv_bytes`; layers without tensors yet count 0.
    """
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total
