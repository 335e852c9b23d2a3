"""Shared-prefix (cascade) attention for the torch executor.

Rows whose page tables begin with the same pages (beams after the prompt fork, samples of one
prompt) attend that prefix once per group instead of once per row: the group's queries are
stacked into one query block against the prefix K/V (gathered once), each row attends its own
suffix pages, and the two partial results merge by log-sum-exp. The split is page-aligned and
found once per forward from the host-side page lists of the metadata (no device sync).

A prefix is only taken from pages every row of the group holds in full and that end before the
row's first new token, so every query sees the whole prefix (no mask) and its own suffix is never
empty. Sliding-window layers keep the plain path. When every group's prefix has the same number
of pages and the prefixes are consecutive runs at a fixed stride (a prompt batch prefilled into a
fresh pool, or one prompt's beams), the prefix K/V are read as a view of the pool, not gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..metadata import ForwardMetadata, _to_device
from ..tables import consecutive_run
from . import torch_backend as tb
from .params import LayerParams

# Cascade pays once the rows skip gathering a fair share of their keys; below that, the
# second attention call and the merge cost more than the gather they save.
MIN_SAVED_FRACTION = 0.25


@dataclass(slots=True)
class CascadePlan:
    """Derived once per forward and layer setting.

    suffix:        TorchPlan of every row over its own pages (after its group's prefix).
    prefix_rows:   [2 * groups * max_prefix] int64 rows of `pool.view(-1, H_kv, D)` holding each
                   group's prefix keys then values, padded with the zero page; None with prefix_run.
    prefix_run:    (first page, stride): group g's prefix is pages `first + g * stride ...`, all
                   of max_prefix tokens, read in place (torch_backend.rows_view); else None.
    prefix_mask:   [groups, 1, 1, max_prefix] bool (True = attend), or None when every group's
                   prefix has max_prefix tokens.
    group_rows:    [groups, max_members] int64 member rows of each group, padded with `rows` (a zero
                   row); None when the groups are consecutive equal blocks covering every row.
    row_slot:      [rows] int64 position of each row in the `groups * max_members` layout, rows
                   outside any group pointing past it (no prefix); None with group_rows None.
    """

    suffix: tb.TorchPlan
    prefix_rows: torch.Tensor | None
    prefix_mask: torch.Tensor | None
    group_rows: torch.Tensor | None
    row_slot: torch.Tensor | None
    num_groups: int
    max_members: int
    max_prefix: int
    params: LayerParams
    prefix_run: tuple[int, int] | None = None


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a[:limit]` and `b[:limit]` (slice compares run in C)."""
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


def find_groups(meta: ForwardMetadata) -> list[tuple[list[int], int]]:
    """Groups of >= 2 rows sharing a page-aligned prefix: (member rows, prefix pages) each.

    O(rows) plus C-level list compares; reads only the host lists of `meta`.
    """
    indptr, indices, page_size = meta.kv_indptr_host, meta.kv_indices_host, meta.page_size
    by_first: dict[int, list[int]] = {}
    for row in range(meta.num_rows):
        if indptr[row + 1] > indptr[row]:
            by_first.setdefault(indices[indptr[row]], []).append(row)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        first = members[0]
        head = indices[indptr[first]:indptr[first + 1]]
        limit = len(head)
        for row in members:
            num_pages = indptr[row + 1] - indptr[row]
            past = meta.kv_lens[row] - meta.qo_lens[row]
            # Full pages only, all before the first new token; the last page stays in the suffix.
            limit = min(limit, num_pages - 1, past // page_size)
        for row in members[1:]:
            if limit <= 0:
                break
            limit = _common_prefix(head, indices[indptr[row]:indptr[row + 1]], limit)
        if limit > 0:
            groups.append((members, limit))
    return groups


def plan(meta: ForwardMetadata, params: LayerParams, zero_page_id: int) -> CascadePlan | None:
    """A cascade plan for this forward, or None when the plain path is the better (or only) one."""
    if not meta.cascade or meta.kv_indices_host is None or params.window_left >= 0:
        return None
    groups = find_groups(meta)
    if not groups:
        return None
    page_size, rows = meta.page_size, meta.num_rows
    saved = sum((len(members) - 1) * pages * page_size for members, pages in groups)
    if saved < MIN_SAVED_FRACTION * sum(meta.kv_lens):
        return None
    groups, prefix_run = _in_place_groups(groups, meta, zero_page_id)
    prefix_pages = [0] * rows
    for members, pages in groups:
        for row in members:
            prefix_pages[row] = pages
    suffix_meta = _suffix_metadata(meta, prefix_pages)
    suffix = tb.plan(suffix_meta, params, zero_page_id, allow_causal=False)

    device = meta.kv_indptr.device
    indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
    max_pages = max(pages for _, pages in groups)
    prefix_rows = None
    if prefix_run is None:
        page_ids = []
        for members, pages in groups:
            start = indptr[members[0]]
            page_ids.append(indices[start:start + pages] + [zero_page_id] * (max_pages - pages))
        page_ids_t = _to_device(page_ids, torch.int64, device)  # (G, P)
        offsets = torch.arange(page_size, device=device)
        k_rows = (page_ids_t[:, :, None] * page_size + offsets).reshape(-1)  # (G * P * page_size,)
        prefix_rows = torch.cat([k_rows, k_rows + (zero_page_id + 1) * page_size])  # values: the second plane
    max_prefix = max_pages * page_size
    prefix_mask = None
    if any(pages != max_pages for _, pages in groups):
        lengths = _to_device([pages * page_size for _, pages in groups], torch.int64, device)
        prefix_mask = (torch.arange(max_prefix, device=device)[None] < lengths[:, None])[:, None, None]

    num_groups = len(groups)
    max_members = max(len(members) for members, _ in groups)
    dense = len({len(m) for m, _ in groups}) == 1 and [r for m, _ in groups for r in m] == list(range(rows))
    group_rows = row_slot = None
    if not dense:
        padded = [members + [rows] * (max_members - len(members)) for members, _ in groups]
        slots = [num_groups * max_members] * rows
        for g, (members, _) in enumerate(groups):
            for j, row in enumerate(members):
                slots[row] = g * max_members + j
        group_rows = _to_device(padded, torch.int64, device)
        row_slot = _to_device(slots, torch.int64, device)
    return CascadePlan(
        suffix, prefix_rows, prefix_mask, group_rows, row_slot, num_groups, max_members, max_prefix, params, prefix_run
    )


def _consecutive_length(pages: list[int]) -> int:
    """How many leading pages of `pages` are `pages[0], pages[0] + 1, ...`."""
    return _common_prefix(pages, list(range(pages[0], pages[0] + len(pages))), len(pages))


def _in_place_groups(
    groups: list[tuple[list[int], int]], meta: ForwardMetadata, zero_page_id: int
) -> tuple[list[tuple[list[int], int]], tuple[int, int] | None]:
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


def _suffix_metadata(meta: ForwardMetadata, prefix_pages: list[int]) -> ForwardMetadata:
    """`meta` with each row's first `prefix_pages[row]` pages (and their tokens) taken off."""
    indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
    suffix_indices: list[int] = []
    suffix_indptr = [0]
    for row, skip in enumerate(prefix_pages):
        suffix_indices.extend(indices[indptr[row] + skip:indptr[row + 1]])
        suffix_indptr.append(len(suffix_indices))
    device = meta.kv_indptr.device
    page_size = meta.page_size
    return ForwardMetadata(
        qo_indptr=meta.qo_indptr,
        kv_indptr=_to_device(suffix_indptr, torch.int32, device),
        kv_indices=_to_device(suffix_indices, torch.int32, device),
        kv_last_page_len=meta.kv_last_page_len,
        slot_mapping=meta.slot_mapping,
        token_index=meta.token_index,
        copy_src=None,
        copy_dst=None,
        qo_lens=meta.qo_lens,
        kv_lens=[n - skip * page_size for n, skip in zip(meta.kv_lens, prefix_pages)],
        q_len=meta.q_len,
        page_size=page_size,
    )


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


def run(q: torch.Tensor, pool: torch.Tensor, plan: CascadePlan) -> torch.Tensor:
    """Cascade attention of new tokens `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]`."""
    suffix, params = plan.suffix, plan.params
    rows = suffix.num_rows
    packed = tb.pack_gqa(q, suffix)  # (R, H_kv, G*Q, D)
    _, num_kv_heads, gq, head_dim = packed.shape
    k, v = tb.gather_kv(pool, suffix.kv_rows, rows, suffix.max_kv)
    out_s, lse_s = tb.attend(packed, k, v, suffix.mask, params, return_lse=True)

    groups, members = plan.num_groups, plan.max_members
    if plan.group_rows is None:
        by_group = packed.view(groups, members, num_kv_heads, gq, head_dim)
    else:
        padded = torch.cat([packed, packed.new_zeros(1, num_kv_heads, gq, head_dim)])
        by_group = padded.index_select(0, plan.group_rows.view(-1)).view(groups, members, num_kv_heads, gq, head_dim)
    q_p = by_group.transpose(1, 2).reshape(groups, num_kv_heads, members * gq, head_dim)
    if plan.prefix_run is not None:
        k, v = tb.rows_view(pool, plan.prefix_run, groups, plan.max_prefix)
    else:
        k, v = tb.gather_kv(pool, plan.prefix_rows, groups, plan.max_prefix)
    out_p, lse_p = tb.attend(q_p, k, v, plan.prefix_mask, params, return_lse=True)  # (Gr, H_kv, M*G*Q, D)
    out_p = out_p.view(groups, num_kv_heads, members, gq, head_dim).transpose(1, 2)
    lse_p = lse_p.view(groups, num_kv_heads, members, gq).transpose(1, 2)
    if plan.row_slot is None:
        out_p = out_p.reshape(rows, num_kv_heads, gq, head_dim)
        lse_p = lse_p.reshape(rows, num_kv_heads, gq)
    else:
        out_p = torch.cat([out_p.reshape(-1, num_kv_heads, gq, head_dim), out_p.new_zeros(1, num_kv_heads, gq, head_dim)])
        lse_p = torch.cat([lse_p.reshape(-1, num_kv_heads, gq), lse_p.new_full((1, num_kv_heads, gq), float("-inf"))])
        out_p, lse_p = out_p.index_select(0, plan.row_slot), lse_p.index_select(0, plan.row_slot)
    return tb.unpack_gqa(merge(out_p, lse_p, out_s, lse_s), suffix)
