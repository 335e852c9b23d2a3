"""KV cache groups: layers that share an attention window share page tables (vLLM V1's hybrid
allocator idea).

A full-attention group keeps every token of a row. A sliding-window group (window W: a query at
position p sees keys p - W + 1 .. p) lets go of a row's page once every token in it is before
the window of every later query, so a windowed model holds about what stock's window-only cache
(`DynamicSlidingWindowLayer`) holds. All groups draw page ids from the one BlockManager of the
pool: a page id is used by one group at a time and holds K/V of that group's layers only (the
pool tensors of the other layers are not touched at that id).
"""

from dataclasses import dataclass

from . import _compat


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """window: HF's `sliding_window` (tokens a query sees, itself included), None for full attention."""

    window: int | None
    layers: tuple[int, ...]


def layer_groups(config, num_layers: int, enabled: bool = True) -> list[GroupSpec]:
    """The groups of a model's layers, the full-attention group (if any) first, then by window.

    `enabled=False` (or a config whose layer windows cannot be read) gives one full group.
    """
    windows = _compat.layer_windows(config, num_layers) if enabled else [None] * num_layers
    order = sorted(set(windows), key=lambda w: (w is not None, w or 0))
    return [GroupSpec(w, tuple(i for i, x in enumerate(windows) if x == w)) for w in order]


def group_of_layer(groups: list[GroupSpec], num_layers: int) -> list[int]:
    """Index of each layer's group."""
    index = [0] * num_layers
    for g, group in enumerate(groups):
        for layer in group.layers:
            index[layer] = g
    return index
