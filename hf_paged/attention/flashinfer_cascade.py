"""Shared-prefix (cascade) attention with FlashInfer kernels (`PagedConfig(cascade=True)`).

Same split as the torch executor's cascade.py (whose `find_groups` and threshold it reuses): rows
whose page tables begin with the same full pages, all before their first new token, form a group.

- Suffix level: every row over its own pages after its group's prefix, with the ordinary decode
  or prefill wrapper, `return_lse=True`.
- Prefix level: one request per group, all its members' new tokens against the prefix pages
  (`causal=False`: every query sees the whole prefix), prefill wrapper, `return_lse=True`.
- `flashinfer.merge_state` merges the two by their base-2 log-sum-exp, for the grouped tokens.

The prefix K/V is read once per group instead of once per row. Planned from the metadata's host
page lists (`meta.kv_indptr_host`, `kv_indices_host`): no device sync.
"""

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from ..metadata import ForwardMetadata
from . import cascade
from .flashinfer_backend import Args, _common_kwargs, decode_plan_args, host_indices, kv_planes, prefill_plan_args
from .flashinfer_support import import_flashinfer
from .params import LayerParams


@dataclass(slots=True)
class FlashInferCascadePlan:
    """suffix, prefix: planned wrappers; token_order: [grouped nnz] int64 the grouped rows' new
    tokens, group by group (the prefix level's query order)."""

    suffix: Any
    prefix: Any
    token_order: torch.Tensor
    dtype: torch.dtype


def _device_list(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def prefix_plan_args(
    meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, groups: list[tuple[list[int], int]]
) -> tuple[Args, list[int]]:
    """`BatchPrefillWithPagedKVCacheWrapper.plan` arguments of the prefix level, and the token order.

    One request per group: qo_indptr [groups + 1] (its members' new tokens), paged_kv_indptr
    [groups + 1], paged_kv_indices (the prefix pages, device), last page length page_size (full).
    """
    indptr, indices, page_size = meta.kv_indptr_host, meta.kv_indices_host, meta.page_size
    qo_starts = [0, *accumulate(meta.qo_lens)]
    token_order: list[int] = []
    qo_per_group, pages = [], []
    for members, num_pages in groups:
        for row in members:
            token_order.extend(range(qo_starts[row], qo_starts[row + 1]))
        qo_per_group.append(sum(meta.qo_lens[row] for row in members))
        start = indptr[members[0]]
        pages.extend(indices[start:start + num_pages])
    pin = meta.kv_indptr.device.type == "cuda"

    def host(values: list[int]) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.int32)
        return tensor.pin_memory() if pin else tensor

    args = (
        host([0, *accumulate(qo_per_group)]),
        host([0, *accumulate(num_pages for _, num_pages in groups)]),
        _device_list(pages, torch.int32, meta.kv_indptr.device),
        host([page_size] * len(groups)),
        params.num_qo_heads, params.num_kv_heads, params.head_dim, page_size,
    )
    return (args, {"causal": False, **_common_kwargs(params, dtype)}), token_order


def plan(
    executor: Any, meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype
) -> FlashInferCascadePlan | None:
    """Plan both levels, or None when the plain path is the better (or only) one."""
    if not meta.cascade or meta.kv_indices_host is None or params.window_left >= 0:
        return None
    groups = cascade.find_groups(meta)
    saved = sum((len(members) - 1) * pages * meta.page_size for members, pages in groups)
    if not groups or saved < cascade.MIN_SAVED_FRACTION * sum(meta.kv_lens):
        return None
    (prefix_args, prefix_kwargs), token_order = prefix_plan_args(meta, params, dtype, groups)
    if not token_order:
        return None
    prefix_pages = [0] * meta.num_rows
    for members, pages in groups:
        for row in members:
            prefix_pages[row] = pages
    suffix_meta = cascade._suffix_metadata(meta, prefix_pages)
    kind = "decode" if meta.is_decode else "prefill"
    build = decode_plan_args if kind == "decode" else prefill_plan_args
    pin = meta.kv_indptr.device.type == "cuda"
    suffix_args = build(suffix_meta, params, dtype, host_indices(suffix_meta, pin_memory=pin))
    suffix = executor.plan_wrapper(meta.kv_indptr.device, (kind, params), *suffix_args, dtype)
    prefix = executor.plan_wrapper(meta.kv_indptr.device, ("prefix", params), prefix_args, prefix_kwargs, dtype)
    order = _device_list(token_order, torch.int64, meta.kv_indptr.device)
    return FlashInferCascadePlan(suffix, prefix, order, dtype)


def run(q: torch.Tensor, layer_pool: torch.Tensor, plan: FlashInferCascadePlan) -> torch.Tensor:
    """Cascade attention of `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]` in q's dtype."""
    q = q.to(plan.dtype).contiguous()
    out, lse = plan.suffix.run(q, kv_planes(layer_pool), return_lse=True)  # (nnz, H_q, D), (nnz, H_q) base 2
    order = plan.token_order
    prefix_out, prefix_lse = plan.prefix.run(q.index_select(0, order), kv_planes(layer_pool), return_lse=True)
    suffix_out, suffix_lse = out.index_select(0, order), lse.index_select(0, order)
    merged, _ = import_flashinfer().merge_state(prefix_out, prefix_lse, suffix_out, suffix_lse)
    return out.index_copy(0, order, merged.to(out.dtype))
