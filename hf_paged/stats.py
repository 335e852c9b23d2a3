"""memory_stats: what the page pool of a wrapped model holds, now and at its peak."""

import torch

from .runtime import runtime_of


def memory_stats(model: torch.nn.Module) -> dict[str, int]:
    """Pool geometry and occupancy of a wrapped model.

    `peak_pages_in_use` and `peak_shared_pages` (pages held by more than one row) are those of
    the generate() call that finished last, counted by its own cache: pages that concurrent calls
    held meanwhile are not included. `pages_in_use` is the whole pool's, now. `*_bytes` count keys
    and values of all layers.
    """
    runtime = runtime_of(model, "memory_stats")
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
