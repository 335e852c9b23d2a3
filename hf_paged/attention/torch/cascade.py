"""Shared-prefix (cascade) attention for the torch executor.

Rows of a group (attention/prefix.py finds them, page-aligned, once per forward from the
metadata's host page lists: no device sync) attend their shared prefix once per group instead of
once per row: the group's queries are stacked into one query block against the prefix K/V
(gathered once), each row attends its own suffix pages, and the two partial results merge by
log-sum-exp. When every group's prefix has the same number of pages and the prefixes are
consecutive runs at a fixed stride (a prompt batch prefilled into a fresh pool, or one prompt's
beams), the prefix K/V are read as a view of the pool, not gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...memory.kv_quant import dequantize
from ...memory.reservations import consecutive_run
from .. import prefix
from ..metadata import ForwardMetadata, to_device
from ..params import LayerParams
from . import dense, reads


@dataclass(slots=True)
class CascadePlan:
    """Derived once per forward and layer setting.

    suffix:        TorchPlan of every row over its own pages (after its group's prefix).
    prefix_slots:  [2 * groups * max_prefix] int64 slots (indices into `pool.view(-1, H_kv, D)`) of
                   each group's prefix keys then values, padded with the zero page; None with prefix_run.
    prefix_run:    (first page, stride): group g's prefix is pages `first + g * stride ...`, all
                   of max_prefix tokens, read in place (reads.rows_view); else None.
    prefix_mask:   [groups, 1, 1, max_prefix] bool (True = attend), or None when every group's
                   prefix has max_prefix tokens.
    group_rows:    [groups, max_members] int64 member rows of each group, padded with `rows` (a zero
                   row); None when the groups are consecutive equal blocks covering every row.
    row_position:  [rows] int64 position of each row in the `groups * max_members` layout, rows
                   outside any group pointing past it (no prefix); None with group_rows None.
    """

    suffix: dense.TorchPlan
    prefix_slots: torch.Tensor | None
    prefix_mask: torch.Tensor | None
    group_rows: torch.Tensor | None
    row_position: torch.Tensor | None
    num_groups: int
    max_members: int
    max_prefix: int
    params: LayerParams
    prefix_run: tuple[int, int] | None = None


def plan(meta: ForwardMetadata, params: LayerParams, zero_page_id: int) -> CascadePlan | None:
    """A cascade plan for this forward, or None when the plain path is the better (or only) one."""
    groups = prefix.shared_groups(meta, params)
    if groups is None:
        return None
    page_size, rows = meta.page_size, meta.num_rows
    groups, prefix_run = _in_place_groups(groups, meta, zero_page_id)
    suffix_meta = prefix.suffix_metadata(meta, prefix.prefix_pages(rows, groups))
    suffix = dense.plan(suffix_meta, params, zero_page_id, allow_causal=False)

    device = meta.device
    indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
    max_pages = max(pages for _, pages in groups)
    prefix_slots = None
    if prefix_run is None:
        page_ids = []
        for members, pages in groups:
            start = indptr[members[0]]
            page_ids.append(indices[start:start + pages] + [zero_page_id] * (max_pages - pages))
        page_ids_t = to_device(page_ids, torch.int64, device)  # (G, P)
        offsets = torch.arange(page_size, device=device)
        k_slots = (page_ids_t[:, :, None] * page_size + offsets).reshape(-1)  # (G * P * page_size,)
        prefix_slots = torch.cat([k_slots, k_slots + (zero_page_id + 1) * page_size])  # values: the second plane
    max_prefix = max_pages * page_size
    prefix_mask = None
    if any(pages != max_pages for _, pages in groups):
        lengths = to_device([pages * page_size for _, pages in groups], torch.int64, device)
        prefix_mask = (torch.arange(max_prefix, device=device)[None] < lengths[:, None])[:, None, None]

    num_groups = len(groups)
    max_members = max(len(members) for members, _ in groups)
    equal_blocks = len({len(m) for m, _ in groups}) == 1 and [r for m, _ in groups for r in m] == list(range(rows))
    group_rows = row_position = None
    if not equal_blocks:
        padded = [members + [rows] * (max_members - len(members)) for members, _ in groups]
        positions = [num_groups * max_members] * rows
        for g, (members, _) in enumerate(groups):
            for j, row in enumerate(members):
                positions[row] = g * max_members + j
        group_rows = to_device(padded, torch.int64, device)
        row_position = to_device(positions, torch.int64, device)
    return CascadePlan(
        suffix, prefix_slots, prefix_mask, group_rows, row_position, num_groups, max_members, max_prefix, params, prefix_run
    )


def _consecutive_length(pages: list[int]) -> int:
    """How many leading pages of `pages` are `pages[0], pages[0] + 1, ...`."""
    return prefix.common_prefix(pages, list(range(pages[0], pages[0] + len(pages))), len(pages))


def _in_place_groups(
    groups: prefix.Groups, meta: ForwardMetadata, zero_page_id: int
) -> tuple[prefix.Groups, tuple[int, int] | None]:
    """Groups whose prefixes can be read in place, and the (first, stride) run they form.

    Each group's prefix is cut to the pages it holds consecutively and all to one length, when that
    keeps at least 3/4 of the longest prefix: a beam's copy-on-write page after the prompt breaks
    the run at its end, and that page then joins each row's suffix. Otherwise the groups come back
    unchanged with None (the prefixes are gathered).
    """
    indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
    heads = [indices[indptr[members[0]]:indptr[members[0]] + pages] for members, pages in groups]
    length = min(_consecutive_length(head) for head in heads)
    if 4 * length < 3 * max(pages for _, pages in groups):
        return groups, None
    run = consecutive_run([head[:length] for head in heads], zero_page_id)
    if run is None:
        return groups, None
    return [(members, length) for members, _ in groups], run


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Softmax-weighted merge of two partial attentions `[..., D]` with natural-log LSE `[...]` float32.

    A part with LSE -inf (no keys) gets weight 0; `lse_b` must be finite.
    """
    top = torch.maximum(lse_a, lse_b)
    weight_a = torch.exp(lse_a - top)
    weight_b = torch.exp(lse_b - top)
    total = weight_a + weight_b
    out = out_a.float() * (weight_a / total)[..., None] + out_b.float() * (weight_b / total)[..., None]
    return out.to(out_b.dtype)


def run(q: torch.Tensor, pool: torch.Tensor, plan: CascadePlan, scales: tuple[float, float] | None = None) -> torch.Tensor:
    """Cascade attention of new tokens `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]`.
    `scales`: fp8 pages' (k_scale, v_scale): the K/V read are dequantized (dense.run)."""
    suffix, params = plan.suffix, plan.params
    rows = suffix.num_rows
    # In half precision both partial results are computed and merged in float32 and rounded once at
    # the end, as stock's one softmax rounds once: half-precision partials would round twice.
    half = q.dtype in (torch.float16, torch.bfloat16)
    target = torch.float32 if half else q.dtype
    k_scale, v_scale = scales if scales is not None else (1.0, 1.0)

    def wide(t: torch.Tensor, scale: float) -> torch.Tensor:  # fp8 pages: dequantized straight to `target`
        return dequantize(t, target, scale) if scales is not None else t.to(target)
    packed = dense.pack_gqa(q, suffix)  # (R, H_kv, group*Q, D)
    packed = packed.float() if half else packed
    _, num_kv_heads, packed_len, head_dim = packed.shape
    k, v = reads.gather_kv(pool, suffix.kv_slots, rows, suffix.max_kv)
    out_s, lse_s = dense.attend(packed, wide(k, k_scale), wide(v, v_scale), suffix.mask, params, return_lse=True)

    groups, members = plan.num_groups, plan.max_members
    per_row = (num_kv_heads, packed_len, head_dim)  # one row's packed queries
    if plan.group_rows is None:
        by_group = packed.view(groups, members, *per_row)
    else:
        padded = torch.cat([packed, packed.new_zeros(1, *per_row)])
        by_group = padded.index_select(0, plan.group_rows.view(-1)).view(groups, members, *per_row)
    group_q = by_group.transpose(1, 2).reshape(groups, num_kv_heads, members * packed_len, head_dim)
    if plan.prefix_run is not None:
        k, v = reads.rows_view(pool, plan.prefix_run, groups, plan.max_prefix)
    else:
        k, v = reads.gather_kv(pool, plan.prefix_slots, groups, plan.max_prefix)
    out_p, lse_p = dense.attend(group_q, wide(k, k_scale), wide(v, v_scale), plan.prefix_mask, params, return_lse=True)  # (Gr, H_kv, M*group*Q, D)
    out_p = out_p.view(groups, num_kv_heads, members, packed_len, head_dim).transpose(1, 2)
    lse_p = lse_p.view(groups, num_kv_heads, members, packed_len).transpose(1, 2)
    if plan.row_position is None:
        out_p = out_p.reshape(rows, *per_row)
        lse_p = lse_p.reshape(rows, num_kv_heads, packed_len)
    else:
        out_p = torch.cat([out_p.reshape(-1, *per_row), out_p.new_zeros(1, *per_row)])
        lse_p = torch.cat([lse_p.reshape(-1, num_kv_heads, packed_len), lse_p.new_full((1, num_kv_heads, packed_len), float("-inf"))])
        out_p, lse_p = out_p.index_select(0, plan.row_position), lse_p.index_select(0, plan.row_position)
    return dense.unpack_gqa(merge(out_p, lse_p, out_s, lse_s).to(q.dtype), suffix)
