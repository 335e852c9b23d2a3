"""KV page pools: one tensor per layer, on that layer's device: a key plane and a value plane.

Each plane is `[num_pages + 1, page_size, H_kv, D]`, FlashInfer's NHD layout (FlashInfer takes
the pair as a `(k_cache, v_cache)` tuple). Keeping keys apart from values makes the keys of
consecutive pages one contiguous run of tokens: a row whose pages are consecutive is a plain
view of the pool, read with no gather (see PageTables.reserve and the torch executor).
"""

import os
import threading
import weakref
from dataclasses import dataclass

import torch

from .blocks import BlockManager
from .config import DEFAULT_CPU_FRACTION, DEFAULT_CUDA_FRACTION, PagedConfig
from .prefix_cache import PrefixCache


@dataclass(slots=True)
class LayerSpec:
    """What one attention layer stores per token."""

    num_kv_heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: what the CUDA driver reports, or available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not Linux: assume a modest 8 GiB
        return 8 << 30


def id_bytes(specs: list[LayerSpec], page_sizes: list[int]) -> int:
    """Bytes one page id reserves over all layers (layer i's pages hold `page_sizes[i]` tokens)."""
    return sum(size * spec.bytes_per_token for spec, size in zip(specs, page_sizes))


def choose_num_pages(config: PagedConfig, specs: list[LayerSpec], page_sizes: list[int] | None = None) -> int:
    """Pages the pool gets: `num_pages`, else the budget divided by the bytes of one page id."""
    if config.num_pages is not None:
        return config.num_pages
    page_sizes = page_sizes or [config.page_size] * len(specs)
    page_bytes = id_bytes(specs, page_sizes)
    budget = config.max_memory
    if budget is None or isinstance(budget, float):
        devices = {spec.device for spec in specs}
        on_cuda = any(device.type == "cuda" for device in devices)
        fraction = budget if budget is not None else (DEFAULT_CUDA_FRACTION if on_cuda else DEFAULT_CPU_FRACTION)
        # The pool spreads over the layers' devices; the tightest device bounds it.
        budget = min(
            int(fraction * free_memory_bytes(device) * _share_of_device(device, specs, page_sizes)) for device in devices
        )
    if budget < page_bytes:
        raise ValueError(
            f"a pool budget of {budget} bytes (max_memory={config.max_memory!r}) is smaller than one page "
            f"({page_bytes} bytes: pages of {sorted(set(page_sizes))} tokens over all layers); "
            "pass a larger max_memory, or num_pages"
        )
    return budget // page_bytes


def _share_of_device(device: torch.device, specs: list[LayerSpec], page_sizes: list[int]) -> float:
    """Inverse of the fraction of a page's bytes that lands on `device` (>= 1)."""
    here = [size if spec.device == device else 0 for spec, size in zip(specs, page_sizes)]
    return id_bytes(specs, page_sizes) / id_bytes(specs, here)


class KVPool:
    """The page pools of one model and the BlockManager that hands out their pages.

    `pools[i]` is `[2, num_pages + 1, page_sizes[i], num_kv_heads, head_dim]` (`[0]` keys, `[1]`
    values, each NHD) in layer i's dtype on layer i's device. `page_size` is the config's (every
    layer's, unless sliding-window groups take smaller pages: groups.py); the prefix cache keys
    prompts by it. The extra last page is kept zero and
    never handed out: padded reads of the torch executor point there.

    Many caches, one pool: every open PagedCache draws pages from `blocks`, whose lock makes each
    page-table change atomic. `num_open_caches()` counts the caches not yet released. A cache that
    is garbage-collected unreleased stops counting, and its page tables are queued by a finalizer
    (`cache_dropped`) and released at the next `open_cache`, `num_open_caches` or memory_stats:
    a finalizer may run inside any allocation of any thread, so it only appends to a list.
    `write_lock` is held by a compiled decode step (a compiled graph may write the whole pool back,
    functionalized) and by copy-on-write copies, so neither overwrites the other's pages.
    """

    def __init__(self, config: PagedConfig, specs: list[LayerSpec], page_sizes: list[int] | None = None):
        self.page_size = config.page_size
        self.specs = specs
        self.page_sizes = list(page_sizes) if page_sizes is not None else [config.page_size] * len(specs)
        if len(self.page_sizes) != len(specs) or any(config.page_size % size for size in self.page_sizes):
            raise ValueError(f"expected a page size dividing {config.page_size} per layer, got {self.page_sizes}")
        self.num_pages = choose_num_pages(config, specs, self.page_sizes)
        self.zero_page_id = self.num_pages
        self._open_caches: weakref.WeakSet = weakref.WeakSet()
        self._dropped: list[list] = []  # page tables of caches collected unreleased (cache_dropped)
        self.write_lock = threading.RLock()
        self.pools: list[torch.Tensor] = []
        try:
            for spec, page_size in zip(specs, self.page_sizes):
                pool = torch.empty(
                    (2, self.num_pages + 1, page_size, spec.num_kv_heads, spec.head_dim),
                    dtype=spec.dtype,
                    device=spec.device,
                )
                pool[:, self.zero_page_id].zero_()
                self.pools.append(pool)
            self.blocks = BlockManager(self.num_pages)
            # Full prompt pages kept across calls (PagedConfig.prefix_cache); it registers as the evictor.
            self.prefix_cache = PrefixCache(self.blocks, self.page_size) if config.prefix_cache else None
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            self.pools.clear()
            raise MemoryError(
                f"could not allocate a page pool of {self.num_pages} pages x {self.page_bytes} bytes = "
                f"{self.num_pages * self.page_bytes / 2**30:.1f} GiB on {sorted({str(s.device) for s in specs})}; "
                "pass a smaller num_pages, or max_memory (bytes, or a fraction of free memory such as 0.2)"
            ) from error

    def open_cache(self, cache: object) -> None:
        with self.blocks.lock:
            self.reclaim_dropped()
            self._open_caches.add(cache)

    def close_cache(self, cache: object) -> None:
        with self.blocks.lock:
            self._open_caches.discard(cache)

    def num_open_caches(self) -> int:
        with self.blocks.lock:
            self.reclaim_dropped()
            return len(self._open_caches)

    def cache_dropped(self, group_tables: list) -> None:
        """Finalizer of a PagedCache collected unreleased: queue its page tables (no lock taken here)."""
        self._dropped.append(group_tables)  # atomic; the lock may be held by whatever the collector interrupted

    def reclaim_dropped(self) -> None:
        """Give back the pages of every cache collected unreleased (see cache_dropped)."""
        with self.blocks.lock:
            while self._dropped:
                for tables in self._dropped.pop():
                    tables.release()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page id across all layers, keys and values."""
        return id_bytes(self.specs, self.page_sizes)

    def layer_bytes(self, layers: tuple[int, ...]) -> int:
        """Bytes of one page id in `layers` (a group's), keys and values."""
        return sum(self.page_sizes[layer] * self.specs[layer].bytes_per_token for layer in layers)

    @property
    def num_layers(self) -> int:
        return len(self.pools)


def copy_pages(layer_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy pages `src[i]` to `dst[i]` (keys and values) in one indexed copy: copy-on-write."""
    pages = layer_pool.view(2, layer_pool.shape[1], -1)
    pages.index_copy_(1, dst, pages.index_select(1, src))
