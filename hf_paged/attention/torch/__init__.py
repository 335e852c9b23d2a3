"""The pure-PyTorch executor (any device, any dtype): plain paged attention (dense.py) or, when
rows share a prefix worth it (attention/prefix.py), shared-prefix attention (cascade.py)."""

from typing import Any

import torch

from ...memory.pool import KVPool
from ..metadata import ForwardMetadata
from ..params import LayerParams
from . import cascade, dense

Plan = dense.TorchPlan | cascade.CascadePlan


def plan(meta: ForwardMetadata, params: LayerParams, zero_page_id: int, exact: bool = False) -> Plan:
    """A cascade plan when `meta.cascade` and rows share a prefix worth it, else a plain one
    (`exact`: stock's query layout in every decode step, dense.query_layout)."""
    if meta.cascade and not params.alibi_slopes:  # cascade's merge knows no per-key bias
        shared = cascade.plan(meta, params, zero_page_id)
        if shared is not None:
            return shared
    return dense.plan(meta, params, zero_page_id, exact=exact)


def run(q: torch.Tensor, pool: torch.Tensor, plan: Plan, scales: tuple[float, float] | None = None) -> torch.Tensor:
    """Attention of new tokens `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]`
    (`scales`: fp8 pages' (k_scale, v_scale), memory/kv_quant.py)."""
    if plan.__class__ is dense.TorchPlan:
        return dense.run(q, pool, plan, scales)
    return cascade.run(q, pool, plan, scales)


class TorchExecutor:
    """The pure-PyTorch executor (any device, any dtype).

    `exact`: SDPA gets stock's query layout in decode steps without a mask too (PagedConfig.exact;
    dense.query_layout), where the default packs grouped-query heads, which reads K/V once per KV head.
    """

    name = "torch"
    cascade_by_default = True  # measured: it pays on CPU (docs/benchmarks.md)
    reads_in_place = True  # reads.rows_view / the cascade's prefix_run
    op_runner = "torch"  # built into ops.paged_attention
    exact = False

    def __init__(self, exact: bool = False) -> None:
        self.exact = exact

    def plan(self, meta: ForwardMetadata, params: LayerParams, pool: KVPool) -> Plan:
        return plan(meta, params, pool.zero_page_id, self.exact)

    def advance_plan(self, plan: Plan, meta: ForwardMetadata) -> Plan | None:
        """`plan` moved on by one token per row, for a decode step on the same pages (None: plan anew)."""
        return dense.advance_plan(plan, meta) if plan.__class__ is dense.TorchPlan else None

    def run(self, q: torch.Tensor, layer_pool: torch.Tensor, plan: Plan,
            scales: tuple[float, float] | None = None) -> torch.Tensor:
        return run(q, layer_pool, plan, scales)

    def plan_decode(self, meta: ForwardMetadata, cache: Any) -> None:
        """Nothing to prepare: the torch runner derives everything from the step's buffers."""
