"""KV cache groups: layers that share an attention window share page tables (vLLM V1's hybrid
allocator idea).

A full-attention group keeps every token of a row. A sliding-window group (window W: a query at
position p sees keys p - W + 1 .. p) lets go of a row's page once every token in it is before
the window of every later query, so a windowed model holds about what stock's window-only cache
(`DynamicSlidingWindowLayer`) holds. All groups draw page ids from the one BlockManager of the
pool: a page id is used by one group at a time and holds K/V of that group's layers only (the
pool tensors of the other layers are not touched at that id).

A group has its own page size. A sliding group holds a row's window plus the unused part of the
page at each end of it; with pages of 16 that is up to 30 slots more than the window, 24% of a
window of 128. Sliding groups therefore take smaller pages (`PagedConfig.window_page_size`; by
default the largest that packs beside the full layers, layout.py, config.WINDOW_PAGE_SIZE_RULE;
`window_page_size()` below is the size without full layers): the pool tensors of their layers are
`[2, num_pages + 1, group page size, H_kv, D]`, and one page id holds that many tokens there.
Full groups keep `page_size`. The prefix cache keys a whole number of pages of every group (the
least common multiple of their page sizes, pool.prefix_key_size).
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """window: HF's `sliding_window` (tokens a query sees, itself included), None for full attention.
    page_size: token slots of one page of this group's layers.
    cache_window: the window is only the cache's: the layers' attention applies a wider one or none
    (Moshi), so their queries see what stock's window-only cache returns (PagedCache.attend). Set
    when a layer is first seen attending wider.
    cross: the decoder's cross-attention layers of an encoder-decoder model (cache/cross.py): pages
    per input, written once per call and read by every row of that input; never part of a row's
    page tables."""

    window: int | None
    layers: tuple[int, ...]
    page_size: int
    cache_window: bool = False
    cross: bool = False


def window_page_size(window: int, page_size: int, requested: int | None = None) -> int:
    """Page size of a sliding group: `requested`, else the largest divisor of `page_size` that is at
    most `window // 32` (at least 1), so the two partly used pages at the ends of a window cost at
    most about 1/16 of it."""
    if requested is not None:
        return requested
    limit = max(1, window // 32)
    return max(d for d in range(1, min(page_size, limit) + 1) if page_size % d == 0)


def layer_groups(windows: list[int | None], page_size: int, window_pages: int | None = None) -> list[GroupSpec]:
    """The groups of a model's layers, the full-attention group (if any) first, then by window.

    `windows`: each layer's (`_compat.layer_windows`; all None: one full group).
    `window_pages`: PagedConfig.window_page_size.
    """
    order = sorted(set(windows), key=lambda w: (w is not None, w or 0))
    return [
        GroupSpec(w, tuple(i for i, x in enumerate(windows) if x == w),
                  page_size if w is None else window_page_size(w, page_size, window_pages))
        for w in order
    ]


def layer_page_sizes(groups: list[GroupSpec], num_layers: int) -> list[int]:
    """The page size of each layer's pool."""
    sizes = [0] * num_layers
    for group in groups:
        for layer in group.layers:
            sizes[layer] = group.page_size
    return sizes


def group_of_layer(groups: list[GroupSpec], num_layers: int) -> list[int]:
    """Index of each layer's group."""
    index = [0] * num_layers
    for g, group in enumerate(groups):
        for layer in group.layers:
            index[layer] = g
    return index
