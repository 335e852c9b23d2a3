"""memory_stats: what the page pool of a wrapped model holds, now and at its peak."""

import torch


def memory_stats(model: torch.nn.Module) -> dict[str, int]:
    """Pool geometry and occupancy of a wrapped model.

    `peak_pages_in_use` and `peak_shared_pages` (pages held by more than one row) cover the most
    recent generate() call; `*_bytes` count keys and values of all layers.
    """
    runtime = getattr(model, "hf_paged_runtime", None)
    if runtime is None:
        raise ValueError("memory_stats needs a model wrapped by hf_paged.wrap(model)")
    pool = runtime.pool
    blocks = pool.blocks
    return {
        "page_size": pool.page_size,
        "num_pages": pool.num_pages,
        "page_bytes": pool.page_bytes,
        "pool_bytes": pool.num_pages * pool.page_bytes,
        "pages_in_use": blocks.num_used_pages,
        "shared_pages": blocks.num_shared_pages,
        "peak_pages_in_use": runtime.last_peak_pages,
        "peak_shared_pages": runtime.last_peak_shared_pages,
        "peak_kv_bytes": runtime.last_peak_pages * pool.page_bytes,
    }


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
