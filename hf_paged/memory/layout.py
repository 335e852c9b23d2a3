"""How page ids map to bytes: one id space, and an id holds the same bytes whichever group uses it.

vLLM V1's hybrid allocator gives every group of layers pages of equal bytes, so one free list
serves all groups and the budget moves to whichever group needs it: a long prompt's pages go to
the full-attention layers, a wide beam search's to the windows. hf_paged does the same with
*slices*: per device, one uint8 tensor `[2, num_pages + 1, slice bytes]` (keys plane, values
plane) per layer of the *anchor* group (the full-attention group, else the group whose pages are
largest). Page id p is slot p of every slice, and it is held by one group at a time:

- an anchor layer's pages fill its slice: its pool is a contiguous `[2, num_pages + 1, page_size,
  H_kv, D]` view, exactly the tensor an unpaged-by-groups pool would have;
- another group's layers are packed side by side into the slices (several sliding layers' small
  pages in one full layer's page), at a byte offset: their pools are views with a page stride of
  the slice. The group's page size is chosen to fill the slices: with one full layer of pages of
  16 and five sliding layers, the sliding pages hold 3 tokens (15 of the 16 token slots an id has).

So an id reserves the same bytes whichever group holds it, and no group's page reserves memory
its layers do not use beyond the rounding of that packing (`Layout.used_bytes`). What did not
fit (more layers than the anchor's slices hold even at pages of one token, other head shapes)
gets slices of its own, which the anchor's ids then carry unused: correct, and rare.
"""

from dataclasses import dataclass, replace

import torch

from .groups import GroupSpec


@dataclass(slots=True)
class LayerSpec:
    """What one attention layer stores per token."""

    num_kv_heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype  # the layer's (its weights')
    kv_dtype: torch.dtype | None = None  # what its pages store (PagedConfig.kv_cache_dtype); None: `dtype`

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.storage_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Keys and values."""
        return 2 * self.num_kv_heads * self.head_dim * self.element_size

    def plane_bytes(self, page_size: int) -> int:
        """Bytes of one page of `page_size` tokens in one plane (keys, or values)."""
        return page_size * self.bytes_per_token // 2


@dataclass(frozen=True, slots=True)
class Slice:
    """One pool tensor `[2, num_pages + 1, plane_bytes]` (uint8) on `device`."""

    device: torch.device
    plane_bytes: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a layer's page of each id lives: in slice `slice`, `offset` bytes into the id's page."""

    slice: int
    offset: int


@dataclass(slots=True)
class Layout:
    """The groups (with their page sizes), the slices, and each layer's placement."""

    groups: list[GroupSpec]
    slices: list[Slice]
    placements: list[Placement]

    @property
    def page_bytes(self) -> int:
        """Bytes one page id reserves over all devices, keys and values."""
        return 2 * sum(s.plane_bytes for s in self.slices)

    def device_bytes(self, device: torch.device) -> int:
        """Bytes one page id reserves on `device`."""
        return 2 * sum(s.plane_bytes for s in self.slices if s.device == device)


def plan_layout(specs: list[LayerSpec], groups: list[GroupSpec], page_size: int,
                requested: int | None = None, divisors_only: bool = False) -> Layout:
    """Lay the groups' layers out in slices; choose each non-anchor group's page size.

    `requested`: PagedConfig.window_page_size (then that page size, packed where it fits).
    `divisors_only`: non-anchor page sizes must divide `page_size` (the prefix cache keys entries
    by `page_size` tokens and keeps whole pages of every group).
    """
    groups = list(groups)
    anchor = _anchor(specs, groups, page_size, requested)
    anchor_size = groups[anchor].page_size
    slices: list[Slice] = []
    placements: list[Placement | None] = [None] * len(specs)
    for layer in groups[anchor].layers:
        placements[layer] = Placement(len(slices), 0)
        slices.append(Slice(specs[layer].device, specs[layer].plane_bytes(anchor_size)))
    for index, group in enumerate(groups):
        if index == anchor:
            continue
        if requested is not None:
            candidates = [requested]
        elif divisors_only:
            candidates = [d for d in range(page_size, 0, -1) if page_size % d == 0]
        else:
            candidates = list(range(page_size, 0, -1))
        for size in candidates:  # the largest page that packs: fills the ids best
            packed = _pack(specs, group.layers, size, slices)
            if packed is not None:
                break
        else:  # does not fit the anchor's slices: its own slices for what is left over
            size = group.page_size
            packed = _pack(specs, group.layers, size, slices, grow=True)
        for layer, placement in packed.items():
            placements[layer] = placement
        groups[index] = replace(group, page_size=size)
    return Layout(groups, slices, placements)


def _anchor(specs: list[LayerSpec], groups: list[GroupSpec], page_size: int, requested: int | None) -> int:
    """The full-attention group if any, else the group whose pages (at its default size) are largest."""
    for index, group in enumerate(groups):
        if group.window is None:
            return index

    def size(group: GroupSpec) -> int:
        return sum(specs[layer].plane_bytes(group.page_size) for layer in group.layers)

    return max(range(len(groups)), key=lambda index: size(groups[index]))


def _pack(specs: list[LayerSpec], layers: tuple[int, ...], page_size: int, slices: list[Slice],
          grow: bool = False) -> dict[int, Placement] | None:
    """First fit of each layer's page (of `page_size` tokens) into the slices on its device; None if
    one does not fit. `grow`: append a slice for a layer that does not fit instead."""
    used = [0] * len(slices)
    placed: dict[int, Placement] = {}
    for layer in layers:
        spec = specs[layer]
        need, align = spec.plane_bytes(page_size), spec.element_size
        for index, piece in enumerate(slices):
            offset = -(-used[index] // align) * align
            if piece.device == spec.device and piece.plane_bytes % align == 0 and offset + need <= piece.plane_bytes:
                placed[layer] = Placement(index, offset)
                used[index] = offset + need
                break
        else:
            if not grow:
                return None
            placed[layer] = Placement(len(slices), 0)
            slices.append(Slice(spec.device, need))
            used.append(need)
    return placed


def layer_views(slices: list[torch.Tensor], specs: list[LayerSpec], layout: Layout) -> list[torch.Tensor]:
    """Each layer's pool `[2, num_pages + 1, page_size, H_kv, D]` in its storage dtype: a view of its slice
    (contiguous when the layer fills the slice, else with the slice's page stride)."""
    sizes = {layer: group.page_size for group in layout.groups for layer in group.layers}
    views = []
    for layer, (spec, placement) in enumerate(zip(specs, layout.placements)):
        piece = slices[placement.slice]
        size = sizes[layer]
        nbytes = spec.plane_bytes(size)
        view = piece[:, :, placement.offset : placement.offset + nbytes].view(spec.storage_dtype)
        views.append(view.view(2, piece.shape[1], size, spec.num_kv_heads, spec.head_dim))
    return views
