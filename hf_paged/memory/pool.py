"""KV page pools: per layer a view on that layer's device, a key plane and a value plane, cut out
of the pool's slices (layout.py: how page ids map to bytes when groups of layers share them).

Each plane is `[num_pages + 1, page_size, H_kv, D]`, FlashInfer's NHD layout (FlashInfer takes
the pair as a `(k_cache, v_cache)` tuple). Keeping keys apart from values makes the keys of
consecutive pages one contiguous run of tokens: a row whose pages are consecutive is a plain
view of the pool, read with no gather (see PageTables.reserve and the torch executor).
"""

import math
import os
import threading
import weakref
from dataclasses import replace

import torch

from ..config import DEFAULT_CPU_FRACTION, DEFAULT_CUDA_FRACTION, PagedConfig
from .blocks import BlockManager
from .groups import GroupSpec
from .kv_quant import KVQuant, as_bytes, storage_dtype
from .layout import LayerSpec, Layout, layer_views, plan_layout
from .prefix_cache import PrefixCache

__all__ = ["KVPool", "LayerSpec", "available_ram_bytes", "copy_pages", "free_memory_bytes"]


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: what the CUDA driver reports, or available RAM on CPU (`available_ram_bytes`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_ram_bytes()


def available_ram_bytes(meminfo: str = "/proc/meminfo") -> int:
    """RAM a new allocation can get without swapping: the kernel's MemAvailable (free memory plus
    the page cache and other memory it can reclaim), as `free` and psutil report it.

    Not SC_AVPHYS_PAGES, which is MemFree: it leaves out the page cache, so it shrinks after a
    checkpoint is read from disk (8.4 GB against 14.2 GB available on one machine), and a pool sized
    from it would depend on what was read before. Off Linux: psutil's reading where psutil is
    installed (accelerate depends on it; hf_paged does not), else free RAM, else 8 GiB.
    """
    try:
        with open(meminfo, encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):  # "MemAvailable:   14201232 kB"
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such counter here: assume a modest 8 GiB
        return 8 << 30


def pool_layout(config: PagedConfig, specs: list[LayerSpec], groups: list[GroupSpec] | None = None) -> Layout:
    """How the pool for `specs` lays out its page ids (layout.py); `groups` None: one full group."""
    if groups is None:
        groups = [GroupSpec(None, tuple(range(len(specs))), config.page_size)]
    specs = stored_specs(config, specs)
    layout = plan_layout(specs, groups, config.page_size, config.window_page_size)
    if config.prefix_cache and prefix_key_size(config.page_size, layout.groups) > MAX_KEY_PAGES * config.page_size:
        layout = plan_layout(specs, groups, config.page_size, config.window_page_size, divisors_only=True)
    return layout


def stored_specs(config: PagedConfig, specs: list[LayerSpec]) -> list[LayerSpec]:
    """`specs` with the page dtype PagedConfig.kv_cache_dtype asks for (the layers' own for "auto")."""
    kv_dtype = storage_dtype(config.kv_cache_dtype)
    return [replace(spec, kv_dtype=kv_dtype) for spec in specs]


# The prefix cache keys prompts by whole pages of every group: by the least common multiple of their
# page sizes (48 tokens for pages of 16 and sliding pages of 3), up to this many full pages; past
# it, the sliding groups take pages that divide the full ones instead (smaller: more ids per window).
MAX_KEY_PAGES = 4


def prefix_key_size(page_size: int, groups: list[GroupSpec]) -> int:
    """Tokens per prefix-cache key: a whole number of `page_size` (the config's) and of the pages of every group."""
    return math.lcm(page_size, *(group.page_size for group in groups))


# torch sizes a tensor in int64: a pool slice of more bytes cannot even be asked for (torch.empty
# raises TypeError with a C++ backtrace). No device holds that much; it is a typo or a unit mix-up.
MAX_POOL_BYTES = 2**63 - 1


def choose_num_pages(config: PagedConfig, layout: Layout) -> int:
    """Pages the pool gets: `num_pages`, else the budget divided by the bytes of one page id.

    Raises ValueError, before anything is allocated, for a budget below one page or a pool of
    more than MAX_POOL_BYTES."""
    page_bytes = layout.page_bytes
    if config.num_pages is not None:
        _check_pool_bytes(config.num_pages, page_bytes, f"num_pages={config.num_pages}")
        return config.num_pages
    budget = config.max_memory
    if budget is None or isinstance(budget, float):
        devices = {piece.device for piece in layout.slices}
        on_cuda = any(device.type == "cuda" for device in devices)
        fraction = budget if budget is not None else (DEFAULT_CUDA_FRACTION if on_cuda else DEFAULT_CPU_FRACTION)
        # The pool spreads over the layers' devices; the tightest device bounds it.
        budget = min(
            int(fraction * free_memory_bytes(device) * page_bytes / layout.device_bytes(device)) for device in devices
        )
    if budget < page_bytes:
        raise ValueError(
            f"a pool budget of {budget} bytes (max_memory={config.max_memory!r}) is smaller than one page "
            f"({page_bytes} bytes: one page id over all layers); pass a larger max_memory, or num_pages"
        )
    num_pages = budget // page_bytes
    _check_pool_bytes(num_pages, page_bytes, f"max_memory={config.max_memory!r}")
    return num_pages


def _check_pool_bytes(num_pages: int, page_bytes: int, setting: str) -> None:
    """ValueError saying what to pass when `num_pages` pages (and the zero page) exceed MAX_POOL_BYTES."""
    if (num_pages + 1) * page_bytes > MAX_POOL_BYTES:
        raise ValueError(
            f"{setting} asks for a pool of {num_pages} pages of {page_bytes} bytes (one page id over all layers), "
            "2**63 bytes or more, which no device holds and torch cannot size; pass num_pages=... (pages the "
            "device can hold), or max_memory=... as bytes (8 * 2**30 is 8 GiB) or as a fraction of free memory "
            "(such as 0.2)"
        )


class KVPool:
    """The page pools of one model and the BlockManager that hands out their pages.

    `pools[i]` is `[2, num_pages + 1, page_sizes[i], num_kv_heads, head_dim]` (`[0]` keys, `[1]`
    values, each NHD) in layer i's dtype (fp8 with PagedConfig.kv_cache_dtype: `kv_quant` holds the
    scales) on layer i's device: a view into one of `slices` (layout.py:
    one id space, an id holds `page_bytes` whichever group of layers uses it). `page_size` is the
    config's (the full-attention layers'; sliding-window groups take smaller pages: groups.py); the
    prefix cache keys prompts by whole pages of every group (`prefix_key_size`). `groups` are the
    groups the pool was laid out for, with the page size each got. The extra last page is kept zero and never handed out: padded reads of the
    torch executor point there.

    Many caches, one pool: every open PagedCache draws pages from `blocks`, whose lock makes each
    page-table change atomic. `num_open_caches()` counts the caches not yet released. A cache that
    is garbage-collected unreleased stops counting, and its page tables are queued by a finalizer
    (`cache_dropped`) and released at the next `open_cache`, `num_open_caches` or memory_stats:
    a finalizer may run inside any allocation of any thread, so it only appends to a list.
    `write_lock` is held by a compiled decode step (a compiled graph may write the whole pool back,
    functionalized) and by copy-on-write copies, so neither overwrites the other's pages.
    """

    def __init__(self, config: PagedConfig, specs: list[LayerSpec], groups: list[GroupSpec] | None = None):
        self.page_size = config.page_size
        self.specs = specs = stored_specs(config, specs)
        # fp8 pages: each layer's K and V scales and clamp counts (kv_quant.py); None for "auto".
        kv_dtype = storage_dtype(config.kv_cache_dtype)
        self.kv_quant = KVQuant(kv_dtype, [s.device for s in specs], config.kv_scales) if kv_dtype else None
        self.layout = pool_layout(config, specs, groups)
        self.groups = self.layout.groups
        self.page_sizes = [0] * len(specs)
        for group in self.groups:
            for layer in group.layers:
                self.page_sizes[layer] = group.page_size
        self.num_pages = choose_num_pages(config, self.layout)
        self.zero_page_id = self.num_pages
        self._open_caches: weakref.WeakSet = weakref.WeakSet()
        # Caches generate() returned in its output, still open (memory_stats counts their pages).
        self.returned_caches: weakref.WeakSet = weakref.WeakSet()
        self._dropped: list[list] = []  # page tables of caches collected unreleased (cache_dropped)
        self.write_lock = threading.RLock()
        self.slices: list[torch.Tensor] = []
        self.pools: list[torch.Tensor] = []
        try:
            # Normal tensors even when the pool is made inside torch.inference_mode() (a wrap, or the
            # first call of a copied or retyped model, in an eval loop): an inference tensor could
            # never be written again outside it, and the pool outlives the block.
            with torch.inference_mode(False):
                for piece in self.layout.slices:
                    storage = torch.empty((2, self.num_pages + 1, piece.plane_bytes), dtype=torch.uint8, device=piece.device)
                    storage[:, self.zero_page_id].zero_()
                    self.slices.append(storage)
                self.pools = layer_views(self.slices, specs, self.layout)
            self.blocks = BlockManager(self.num_pages)
            # Full prompt pages kept across calls (PagedConfig.prefix_cache); it registers as the evictor.
            self.prefix_cache = PrefixCache(self.blocks, prefix_key_size(config.page_size, self.groups)) if config.prefix_cache else None
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            self.pools.clear()
            self.slices.clear()
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
        """Bytes one page id reserves over all layers and devices, keys and values (whichever group
        holds it: layout.py)."""
        return self.layout.page_bytes

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool's pages (the zero page left out)."""
        return self.num_pages * self.page_bytes

    def layer_bytes(self, layers: tuple[int, ...]) -> int:
        """Bytes of one page id that `layers` (a group's) use, keys and values (at most `page_bytes`)."""
        return sum(self.page_sizes[layer] * self.specs[layer].bytes_per_token for layer in layers)

    @property
    def num_layers(self) -> int:
        return len(self.pools)


def copy_pages(layer_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy pages `src[i]` to `dst[i]` (keys and values) in one indexed copy: copy-on-write.

    Works on a layer pool with the page stride of its slice (layout.py) as on a contiguous one; such
    a pool is copied plane by plane (`index_select` across its planes copies the whole strided pool
    first: milliseconds per layer, where one plane's pages take microseconds). fp8 pages are copied
    as bytes: a copied page keeps its bytes exactly."""
    layer_pool = as_bytes(layer_pool)
    if layer_pool.is_contiguous():
        layer_pool.index_copy_(1, dst, layer_pool.index_select(1, src))
        return
    for plane in (layer_pool[0], layer_pool[1]):
        plane.index_copy_(0, dst, plane.index_select(0, src))
