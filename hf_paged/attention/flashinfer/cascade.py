"""Shared-prefix (cascade) attention with FlashInfer kernels (`PagedConfig(cascade=True)`).

Same split as the torch executor's (attention/prefix.py finds the groups and decides whether
cascade pays): rows whose page tables begin with the same full pages, all before their first new
token, form a group.

- Suffix level: every row over its own pages after its group's prefix, with the ordinary decode
  or prefill wrapper, `return_lse=True`.
- Prefix level: one request per group, all its members' new tokens against the prefix pages
  (`causal=False`: every query sees the whole prefix), prefill wrapper, `return_lse=True`.
- `flashinfer.merge_state` merges the two by their base-2 log-sum-exp, for the grouped tokens.

The prefix K/V is read once per group instead of once per row. Planned from the metadata's host
page lists (`meta.kv_indptr_host`, `kv_indices_host`): no device sync.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import prefix
from ..metadata import ForwardMetadata, cumsum, host_tensor, to_device
from ..params import LayerParams
from .args import Args, kv_planes, layer_kwargs, plan_args, wrapper_kind
from .support import import_flashinfer

# FlashInferExecutor.plan_wrapper: (device, (kind, params, group), args, kwargs, dtype) -> planned wrapper.
PlanWrapper = Callable[[torch.device, tuple, tuple, dict, torch.dtype], Any]


@dataclass(slots=True)
class FlashInferCascadePlan:
    """suffix, prefix: planned wrappers; token_order: [grouped nnz] int64 the grouped rows' new
    tokens, group by group (the prefix level's query order)."""

    suffix: Any
    prefix: Any
    token_order: torch.Tensor
    dtype: torch.dtype


def prefix_plan_args(
    meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, groups: prefix.Groups
) -> tuple[Args, list[int]]:
    """`BatchPrefillWithPagedKVCacheWrapper.plan` arguments of the prefix level, and the token order.

    One request per group: qo_indptr [groups + 1] (its members' new tokens), paged_kv_indptr
    [groups + 1], paged_kv_indices (the prefix pages, device), last page length page_size (full).
    """
    indptr, indices, page_size = meta.kv_indptr_host, meta.kv_indices_host, meta.page_size
    qo_starts = cumsum(meta.qo_lens)
    token_order: list[int] = []
    qo_per_group, pages = [], []
    for members, num_pages in groups:
        for row in members:
            token_order.extend(range(qo_starts[row], qo_starts[row + 1]))
        qo_per_group.append(sum(meta.qo_lens[row] for row in members))
        start = indptr[members[0]]
        pages.extend(indices[start:start + num_pages])
    pin = meta.device.type == "cuda"
    args = (
        host_tensor(cumsum(qo_per_group), pin_memory=pin),
        host_tensor(cumsum(num_pages for _, num_pages in groups), pin_memory=pin),
        to_device(pages, torch.int32, meta.device),
        host_tensor([page_size] * len(groups), pin_memory=pin),
        params.num_qo_heads, params.num_kv_heads, params.head_dim, page_size,
    )
    return (args, {"causal": False, **layer_kwargs(params, dtype)}), token_order


def plan(
    plan_wrapper: PlanWrapper, meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype
) -> FlashInferCascadePlan | None:
    """Plan both levels through the executor's `plan_wrapper`, or None when the plain path is the
    better (or only) one."""
    groups = prefix.shared_groups(meta, params)
    if groups is None:
        return None
    (prefix_args, prefix_kwargs), token_order = prefix_plan_args(meta, params, dtype, groups)
    if not token_order:
        return None
    suffix_meta = prefix.suffix_metadata(meta, prefix.prefix_pages(meta.num_rows, groups))
    device = meta.device
    suffix = plan_wrapper(device, (wrapper_kind(meta), params, meta.group), *plan_args(suffix_meta, params, dtype), dtype)
    prefix_wrapper = plan_wrapper(device, ("prefix", params, meta.group), prefix_args, prefix_kwargs, dtype)
    order = to_device(token_order, torch.int64, device)
    return FlashInferCascadePlan(suffix, prefix_wrapper, order, dtype)


def run(q: torch.Tensor, layer_pool: torch.Tensor, plan: FlashInferCascadePlan) -> torch.Tensor:
    """Cascade attention of `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]` in q's dtype."""
    q = q.to(plan.dtype).contiguous()
    out, lse = plan.suffix.run(q, kv_planes(layer_pool), return_lse=True)  # (nnz, H_q, D), (nnz, H_q) base 2
    order = plan.token_order
    prefix_out, prefix_lse = plan.prefix.run(q.index_select(0, order), kv_planes(layer_pool), return_lse=True)
    suffix_out, suffix_lse = out.index_select(0, order), lse.index_select(0, order)
    merged, _ = import_flashinfer().merge_state(prefix_out, prefix_lse, suffix_out, suffix_lse)
    return out.index_copy(0, order, merged.to(out.dtype))
