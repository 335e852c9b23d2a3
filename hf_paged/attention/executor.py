"""The contract every attention executor meets, and the capabilities it declares.

An executor has `plan(meta, params, pool) -> plan` (once per forward and distinct layer setting)
and `run(q [nnz, H_q, D], layer_pool, plan, scales=None) -> [nnz, H_q, D]` (once per layer; `scales`:
the layer's (k_scale, v_scale) when its pages hold fp8, memory/kv_quant.py). Both read
exactly the ForwardMetadata; neither gets information the other lacks. Whether a forward takes
the plain or the shared-prefix (cascade) path is the executor's own choice inside `plan`.

The rest of hf_paged never tells executors apart by name: the cache and the compiled decode
steps ask the capabilities below.
"""

from typing import Any, Protocol

import torch

from ..memory.pool import KVPool
from .metadata import ForwardMetadata
from .params import LayerParams


class Executor(Protocol):
    name: str  # for messages and `memory_stats`; never compared
    # PagedConfig(cascade=None) turns shared-prefix attention on exactly when this is True.
    cascade_by_default: bool
    # Reads rows that sit in consecutive pages as views of the pool: PagedCache then has its rows
    # reserve runs of pages (`max_tokens_per_row`); an executor that reads pages where they are
    # gains nothing from a reservation.
    reads_in_place: bool
    # The `torch.ops.hf_paged.paged_attention` backend compiled decode steps call (ops.RUNNERS);
    # "torch" is always there.
    op_runner: str

    def plan(self, meta: ForwardMetadata, params: LayerParams, pool: KVPool) -> object: ...

    def advance_plan(self, plan: object, meta: ForwardMetadata) -> object | None:
        """A decode step's plan from the previous forward's `plan`, when `meta` (advance_metadata)
        holds the same pages with one more token per row; None: `plan` it anew. Per step, so an
        executor whose plan reads the lengths on the host anyway (FlashInfer's) answers None."""
        ...

    def run(self, q: torch.Tensor, layer_pool: torch.Tensor, plan: object,
            scales: tuple[float, float] | None = None) -> torch.Tensor: ...

    def plan_decode(self, meta: ForwardMetadata, cache: Any) -> None:
        """Before every compiled decode step, outside the compiled region: prepare what `op_runner`
        reads inside it. `cache` is cache/static_decode.StaticDecodeCache, its `buffers` already filled."""
        ...
