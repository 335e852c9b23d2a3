"""The torch executor's plain path: paged attention over FlashInfer-format metadata.

Runs on any device and is the reference the FlashInfer executor is checked against. `plan()`
turns the page tables into one gather index and one mask per forward; `run()` gathers a layer's
K/V with a single `index_select` and calls SDPA (or an explicit softmax when logits are soft-capped).
Grouped-query heads are packed into the query length, so K/V are never repeated.

When the rows' pages are consecutive runs at a fixed stride (`tables.consecutive_run` on the host
page lists: rows that reserved their pages and share none) and every row holds the same number of
tokens, the K/V of all rows are a strided view of the pool: nothing is gathered.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metadata import ForwardMetadata, to_device
from ...memory.tables import consecutive_run
from ..params import LayerParams


@dataclass(slots=True)
class TorchPlan:
    """Derived once per forward and layer setting; read by every layer with that setting.

    kv_slots:  [2 * rows * max_kv] int64 slots (indices into `pool.view(-1, H_kv, D)`) of each
               row's keys then values, padded with the pool's zero page; None with `row_run` or `kv_pages`.
    kv_pages:  [2 * rows * pages] int64 page ids of each row's key pages then value pages (values
               offset by num_pages + 1) when every row holds max_kv tokens in its pages
               (`page_gather_index`): whole pages are gathered, one index per page; else None.
    row_run:   (first page, pages per row): row i's K/V are tokens `:max_kv` of pages
               `first + i * stride ...`, read as a view (see `rows_view`); else None.
    mask:      [rows, 1, group * max_q or 1, max_kv] bool (True = attend), or None when every row
               sees every gathered key; with ALiBi [rows, H_kv, group * max_q, max_kv] float32,
               the bias and -inf where a key is not attended (`alibi_mask`).
    q_positions: [nnz] int64 positions of the new tokens in the `rows * max_q` padded layout, or
               None when every row has exactly max_q new tokens.
    causal:    every row is a fresh prompt of max_q tokens (no past, no padding, no window or
               soft cap): plain causal attention, which SDPA runs without a mask, skipping the
               blocks above the diagonal.
    """

    kv_slots: torch.Tensor | None
    mask: torch.Tensor | None
    q_positions: torch.Tensor | None
    num_rows: int
    max_q: int
    max_kv: int
    params: LayerParams
    causal: bool = False
    row_run: tuple[int, int] | None = None
    kv_pages: torch.Tensor | None = None
    # One query per row read by `row_run` or `kv_pages`, no mask, soft cap or bias (greedy and
    # sampled decode steps): the K/V `as_strided` size, strides, and offsets of the keys and of the
    # values (in a contiguous layer pool, or in the gathered pages), and the shapes of the packed
    # query and of the output; else None. `run`'s fewest-calls path.
    decode_view: tuple | None = None
    # Leading keys of every row that no query sees (a window's decode step on rows of equal length):
    # read past instead of masked.
    trim: int = 0
    key_pages: torch.Tensor | None = None  # kv_pages' key half (a packed layer's pool gathers plane by plane)


def kv_lengths(meta: ForwardMetadata) -> torch.Tensor:
    """[rows] int64 KV length of each row from `kv_indptr` and `kv_last_page_len`."""
    num_pages = (meta.kv_indptr[1:] - meta.kv_indptr[:-1]).long()
    lengths = (num_pages - 1) * meta.page_size + meta.kv_last_page_len.long()
    return torch.where(num_pages > 0, lengths, torch.zeros_like(lengths))


def token_slots(meta: ForwardMetadata, max_kv: int, zero_slot: int) -> torch.Tensor:
    """[rows, max_kv] int64 key slots (indices into `pool.view(-1, H, D)`) of tokens `j` of each row.

    Positions past a row's length point at `zero_slot`.
    """
    page_size = meta.page_size
    device = meta.kv_indptr.device
    positions = torch.arange(max_kv, device=device)  # (M,)
    page_pos = meta.kv_indptr[:-1, None].long() + positions[None] // page_size  # (R, M)
    valid = positions[None] < kv_lengths(meta)[:, None]
    num_indices = meta.kv_indices.numel()
    if num_indices == 0:
        return torch.full(valid.shape, zero_slot, dtype=torch.long, device=device)
    page_ids = meta.kv_indices.long()[page_pos.clamp(max=num_indices - 1)]
    slots = page_ids * page_size + positions[None] % page_size
    return torch.where(valid, slots, torch.full_like(slots, zero_slot))


def attention_mask(
    meta: ForwardMetadata, max_q: int, max_kv: int, window_left: int
) -> torch.Tensor:
    """[rows, max_q, max_kv] bool: query i of row r sees key `j`.

    Bottom-right causal (a row's new tokens are the last of its KV), optional left window.
    Padded queries (i >= qo_len) see every real key, so they never produce NaN.
    """
    device = meta.kv_indptr.device
    kv_len = kv_lengths(meta)  # (R,)
    qo_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).long()
    keys = torch.arange(max_kv, device=device)[None, None]  # (1, 1, M)
    query_pos = (kv_len - qo_len)[:, None] + torch.arange(max_q, device=device)[None]  # (R, Q)
    query_pos = query_pos[:, :, None]
    mask = (keys <= query_pos) & (keys < kv_len[:, None, None])
    if window_left >= 0:
        mask &= keys >= query_pos - window_left
    return mask


def kv_gather_slots(index, max_kv: int, zero_page_id: int) -> torch.Tensor:
    """[2 * rows * max_kv] int64 slots of `pool.view(-1, H, D)`: every row's keys `0 .. max_kv - 1`,
    then its values.

    `index` holds FlashInfer's index tensors (a ForwardMetadata, or ops.PagedIndex). The zero page
    is the last page of each plane, so a plane holds `(zero_page_id + 1) * page_size` rows.
    """
    page_size = index.page_size
    k_slots = token_slots(index, max_kv, zero_page_id * page_size).reshape(-1)
    return torch.cat([k_slots, k_slots + (zero_page_id + 1) * page_size])


def padded_query_positions(index, max_q: int, nnz: int) -> torch.Tensor:
    """[nnz] int64 position of each new token in the `rows * max_q` padded layout."""
    qo_len = (index.qo_indptr[1:] - index.qo_indptr[:-1]).long()
    device = qo_len.device
    row_of = torch.repeat_interleave(torch.arange(qo_len.numel(), device=device), qo_len, output_size=nnz)
    within = torch.arange(nnz, device=device) - index.qo_indptr[:-1].long()[row_of]
    return row_of * max_q + within


def packed_mask(index, max_q: int, max_kv: int, params: LayerParams) -> torch.Tensor:
    """[rows, 1, group * max_q (or 1), max_kv] bool mask for `pack_gqa`-packed queries."""
    mask = attention_mask(index, max_q, max_kv, params.window_left)[:, None]  # (R, 1, Q, M)
    if max_q > 1 and params.group_size > 1:
        mask = mask.repeat(1, 1, params.group_size, 1)
    return mask


def alibi_mask(index, max_q: int, max_kv: int, params: LayerParams) -> torch.Tensor:
    """[rows, H_kv, group * max_q, max_kv] float32: `slope * (key - query)` where `packed_mask`
    attends, -inf elsewhere, in `pack_gqa`'s head order (query head = kv head * group + g)."""
    allowed = attention_mask(index, max_q, max_kv, params.window_left)  # (R, Q, M)
    device = allowed.device
    kv_len = kv_lengths(index)
    qo_len = (index.qo_indptr[1:] - index.qo_indptr[:-1]).long()
    query_pos = (kv_len - qo_len)[:, None] + torch.arange(max_q, device=device)[None]  # (R, Q)
    keys = torch.arange(max_kv, device=device)
    distance = keys[None, None] - query_pos[:, :, None]  # (R, Q, M)
    slopes = torch.tensor(params.alibi_slopes, dtype=torch.float32, device=device)
    bias = slopes.view(1, params.num_kv_heads, params.group_size, 1, 1) * distance[:, None, None].float()
    bias = bias.masked_fill(~allowed[:, None, None], float("-inf"))  # (R, H_kv, G, Q, M)
    return bias.view(bias.shape[0], params.num_kv_heads, params.group_size * max_q, max_kv)


def plan(
    meta: ForwardMetadata, params: LayerParams, zero_page_id: int, allow_causal: bool = True
) -> TorchPlan:
    """Gather indices and mask for one forward; no host sync beyond meta's host-side lists.

    Every row attends all its pages (shared prefixes included: the executor in __init__.py picks
    cascade.py instead when that pays). `allow_causal=False` always builds the mask (for callers that attend through `attend`, which
    knows no `causal` flag: cascade's suffix).
    """
    rows, max_q, max_kv = meta.num_rows, meta.max_qo_len, meta.max_kv_len
    # Rows of equal length in consecutive pages: read in place. (With unequal lengths a view would
    # also read the unwritten slots past a shorter row's end; the gather reads the zero page there.)
    row_run = kv_pages = kv_slots = None
    if meta.kv_indices_host is not None and all(n == max_kv for n in meta.kv_lens):
        indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
        row_run = consecutive_run([indices[indptr[r]:indptr[r + 1]] for r in range(rows)], zero_page_id)
        if row_run is None:
            kv_pages = page_gather_index(meta, max_kv, zero_page_id)
    if row_run is None and kv_pages is None:
        kv_slots = kv_gather_slots(meta, max_kv, zero_page_id)
    uniform_q = all(n == max_q for n in meta.qo_lens)
    q_positions = None if uniform_q else padded_query_positions(meta, max_q, sum(meta.qo_lens))
    causal = (
        allow_causal and max_q > 1 and uniform_q and params.window_left < 0 and not params.logits_soft_cap
        and not params.alibi_slopes and all(n == max_q for n in meta.kv_lens)
    )
    # A window's decode step on rows of equal length: each row's query sees exactly its last
    # `window_left + 1` keys, so the keys before them are left out of the read (`trim`) instead of masked.
    # (row_run and kv_pages are found only when every row holds max_kv tokens.)
    trimmed = (
        params.window_left >= 0 and max_q == 1 and uniform_q and not params.alibi_slopes
        and (row_run is not None or kv_pages is not None)
    )
    trim = max(0, max_kv - params.window_left - 1) if trimmed else 0
    needs_mask = not causal and (
        (params.window_left >= 0 and not trimmed) or max_q > 1 or any(n != max_kv for n in meta.kv_lens)
    )
    if params.alibi_slopes:
        mask = alibi_mask(meta, max_q, max_kv, params)
    else:
        mask = packed_mask(meta, max_q, max_kv, params) if needs_mask else None
    decode_view = key_pages = None
    if (row_run is not None or kv_pages is not None) and max_q == 1 and q_positions is None and mask is None \
            and not params.logits_soft_cap:
        heads, dim = params.num_kv_heads, params.head_dim
        page = meta.page_size * heads * dim  # elements per page of `[.., pages, page_size, H, D]`
        if row_run is not None:  # in the pool: values one plane (zero_page_id + 1 pages) after the keys
            first, stride = row_run
            row_stride, key_offset, value_offset = stride * page, first * page, (first + zero_page_id + 1) * page
        else:  # in the gathered pages: every row's key pages, then its value pages
            row_stride = kv_pages.shape[0] // (2 * rows) * page
            key_offset, value_offset = 0, rows * row_stride
            key_pages = kv_pages[: kv_pages.shape[0] // 2]  # (a layer packed into a wider slice gathers by plane)
        skipped = trim * heads * dim  # a row's tokens are `heads * dim` apart
        decode_view = (
            (rows, heads, max_kv - trim, dim), (row_stride, dim, heads * dim, 1), key_offset + skipped,
            value_offset + skipped, (rows, heads, params.group_size, dim), (rows, params.num_qo_heads, dim),
        )
    return TorchPlan(
        kv_slots, mask, q_positions, rows, max_q, max_kv, params, causal, row_run, kv_pages, decode_view, trim, key_pages
    )


def advance_plan(plan: TorchPlan, meta: ForwardMetadata) -> TorchPlan | None:
    """The plan of a decode step whose rows hold the pages of the forward `plan` was made for, one
    token more each (metadata.advance_metadata): only the lengths move. None when `plan` is not a
    decode step's fewest-calls plan (then `plan()` makes a new one)."""
    if plan.decode_view is None or not meta.is_decode:
        return None
    params, max_kv = plan.params, meta.max_kv_len
    trim = max(0, max_kv - params.window_left - 1) if params.window_left >= 0 else 0
    shift = (trim - plan.trim) * params.num_kv_heads * params.head_dim
    (rows, heads, _, dim), strides, key_offset, value_offset, packed, flat = plan.decode_view
    view = ((rows, heads, max_kv - trim, dim), strides, key_offset + shift, value_offset + shift, packed, flat)
    return TorchPlan(
        None, None, None, rows, 1, max_kv, params, False, plan.row_run, plan.kv_pages, view, trim, plan.key_pages
    )


def page_gather_index(meta: ForwardMetadata, max_kv: int, zero_page_id: int) -> torch.Tensor | None:
    """[2 * rows * pages] int64 page ids (every row's key pages, then its value pages, offset by
    `zero_page_id + 1`) when every row holds `max_kv > 0` tokens in exactly `ceil(max_kv /
    page_size)` pages; else None. From the host lists: no device read.

    Whole pages are gathered (contiguous runs of page_size tokens rather than one index per token),
    and the first `max_kv` tokens of each row's run are exactly its tokens: nothing unwritten is read.
    """
    indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
    pages = -(-max_kv // meta.page_size)
    if max_kv == 0 or indptr[-1] != pages * meta.num_rows or any(
        indptr[r + 1] - indptr[r] != pages for r in range(meta.num_rows)
    ):
        return None
    plane = zero_page_id + 1
    return to_device(indices + [page + plane for page in indices], torch.int64, meta.device)


def pack_gqa(q: torch.Tensor, plan: TorchPlan) -> torch.Tensor:
    """[nnz, H_q, D] -> [rows, H_kv, group * max_q, D] (group-major within each KV head)."""
    p = plan.params
    rows, max_q = plan.num_rows, plan.max_q
    if max_q == 1 and plan.q_positions is None:  # decode: the packing is a reshape (one call, not three)
        return q.reshape(rows, p.num_kv_heads, p.group_size, p.head_dim)
    if plan.q_positions is not None:
        padded = q.new_zeros(rows * max_q, p.num_qo_heads, p.head_dim)
        q = padded.index_copy_(0, plan.q_positions, q)
    q = q.view(rows, max_q, p.num_kv_heads, p.group_size, p.head_dim)
    return q.permute(0, 2, 3, 1, 4).reshape(rows, p.num_kv_heads, p.group_size * max_q, p.head_dim)


def unpack_gqa(o: torch.Tensor, plan: TorchPlan) -> torch.Tensor:
    """Inverse of `pack_gqa`: [rows, H_kv, group * max_q, D] -> [nnz, H_q, D]."""
    p = plan.params
    rows, max_q = plan.num_rows, plan.max_q
    if max_q == 1 and plan.q_positions is None:  # decode: a reshape (a view unless o is cascade's merge)
        return o.reshape(rows, p.num_qo_heads, p.head_dim)
    o = o.view(rows, p.num_kv_heads, p.group_size, max_q, p.head_dim).permute(0, 3, 1, 2, 4)
    o = o.reshape(rows * max_q, p.num_qo_heads, p.head_dim)
    return o if plan.q_positions is None else o.index_select(0, plan.q_positions)


def token_rows(pool: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """A layer pool `[2, pages, page_size, H, D]` as token rows `[2, rows, H, D]` (a view) and the
    rows from one page to the next: `page_size` when contiguous, the slice's page stride for a
    layer packed into a wider slice (layout.py), where page p's token o is row `p * stride + o`.
    None for any other layout."""
    _, pages, page_size, heads, dim = pool.shape
    if pool.is_contiguous():
        return pool.view(2, -1, heads, dim), page_size
    page_stride = pool.stride(1)
    if page_stride % (heads * dim) or pool.stride()[2:] != (heads * dim, dim, 1):
        return None
    per_page = page_stride // (heads * dim)
    rows = (pages - 1) * per_page + page_size
    return pool.as_strided((2, rows, heads, dim), (pool.stride(0), heads * dim, dim, 1)), per_page


def packed_slots(slots: torch.Tensor, page_size: int, per_page: int) -> torch.Tensor:
    """Slots `page * page_size + offset` as rows of `token_rows` (`page * per_page + offset`)."""
    return slots if per_page == page_size else slots // page_size * per_page + slots % page_size


def gather_kv(pool: torch.Tensor, kv_slots: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` (views) from a layer pool."""
    num_kv_heads, head_dim = pool.shape[-2], pool.shape[-1]
    if pool.is_contiguous():
        kv = pool.view(-1, num_kv_heads, head_dim).index_select(0, kv_slots)
    else:  # a layer packed into a wider slice (layout.py): its pages sit at the slice's stride
        page_size = pool.shape[2]
        k_slots = kv_slots[: kv_slots.numel() // 2]
        found = token_rows(pool)
        if found is not None:
            tokens, per_page = found
            k_slots = packed_slots(k_slots, page_size, per_page)
            kv = torch.stack([tokens[0].index_select(0, k_slots), tokens[1].index_select(0, k_slots)])
        else:
            pages, offsets = k_slots // page_size, k_slots % page_size
            kv = torch.stack([pool[0][pages, offsets], pool[1][pages, offsets]])
    kv = kv.view(2, rows, length, num_kv_heads, head_dim).transpose(2, 3)
    return kv[0], kv[1]


def gather_pages(pool: torch.Tensor, kv_pages: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` (views of one gathered copy) of whole pages
    `kv_pages` (`page_gather_index`): each row's first `length` tokens."""
    page_size, num_kv_heads, head_dim = pool.shape[2], pool.shape[3], pool.shape[4]
    if pool.is_contiguous():
        pages = pool.view(-1, page_size, num_kv_heads, head_dim).index_select(0, kv_pages)
    else:  # a layer packed into a wider slice (layout.py): the same pages, plane by plane
        key_pages = kv_pages[: kv_pages.shape[0] // 2]  # plane by plane (see pool.copy_pages)
        pages = torch.stack([pool[0].index_select(0, key_pages), pool[1].index_select(0, key_pages)])  # (2, rows * pages, P, H, D)
    row_tokens = kv_pages.shape[0] // (2 * rows) * page_size
    size = (rows, num_kv_heads, length, head_dim)
    strides = (row_tokens * num_kv_heads * head_dim, head_dim, num_kv_heads * head_dim, 1)
    return pages.as_strided(size, strides, 0), pages.as_strided(size, strides, rows * strides[0])


def rows_view(pool: torch.Tensor, row_run: tuple[int, int], rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` of rows stored in consecutive pages: views, no copy
    (a copy for a layer packed into a wider slice, whose consecutive pages are not adjacent)."""
    first, stride = row_run
    page_size, num_kv_heads, head_dim = pool.shape[2], pool.shape[3], pool.shape[4]
    if pool.is_contiguous():  # one as_strided per plane (per layer and step: two calls, not seven)
        plane, page, slot, head, dim = pool.stride()
        size, strides = (rows, num_kv_heads, length, head_dim), (stride * page, head, slot, dim)
        offset = pool.storage_offset() + first * page
        return pool.as_strided(size, strides, offset), pool.as_strided(size, strides, offset + plane)
    tokens = pool[:, first : first + rows * stride].reshape(2, -1, num_kv_heads, head_dim)
    kv = tokens.view(2, rows, stride * page_size, num_kv_heads, head_dim)[:, :, :length].transpose(2, 3)
    return kv[0], kv[1]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, params: LayerParams,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention of packed queries `[R, H_kv, G*Q, D]` on `[R, H_kv, M, D]` K/V.

    `mask`: bool (True = attend), or a float bias (ALiBi's `alibi_mask`) added to the scaled scores.
    Returns the output and, with `return_lse`, the natural-log LSE `[R, H_kv, G*Q]` float32.
    """
    bias = mask is not None and mask.is_floating_point()
    if bias:
        mask = mask.to(q.dtype)
    if not return_lse and not params.logits_soft_cap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=params.sm_scale), None
    if q.device.type == "cpu" and not params.logits_soft_cap:
        # The fused CPU kernel SDPA itself dispatches to, which also returns the natural-log LSE.
        float_mask = mask
        if mask is not None and not bias:
            float_mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=float_mask, scale=params.sm_scale
        )
        return out, lse.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * params.sm_scale
    if bias:  # ALiBi: added to the scaled scores before the cap (FlashInfer's order); -inf marks masked keys
        mask, bias_values = torch.isfinite(mask), mask.float()
        scores = scores + bias_values.masked_fill(~mask, 0.0)
    if params.logits_soft_cap:
        cap = params.logits_soft_cap
        scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.matmul(probs.to(v.dtype), v)
    return out, lse if return_lse else None


def run(q: torch.Tensor, pool: torch.Tensor, plan: TorchPlan) -> torch.Tensor:
    """Attention of new tokens `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]`."""
    if plan.decode_view is not None:
        # A decode step: `rows_view` or `gather_pages`, `pack_gqa`, `attend` and `unpack_gqa` in
        # their fewest calls (per layer and token): two views of the pool, or of one gather, and SDPA.
        size, strides, key_offset, value_offset, packed, flat = plan.decode_view
        k = None
        if plan.kv_pages is not None:
            if pool.is_contiguous():  # one gather: (2 * rows * pages, page_size, H, D), keys then values
                source = pool.view(-1, *pool.shape[2:]).index_select(0, plan.kv_pages)
                k, v = source.as_strided(size, strides, key_offset), source.as_strided(size, strides, value_offset)
            else:  # a layer packed into a wider slice: plane by plane (see pool.copy_pages)
                k = pool[0].index_select(0, plan.key_pages).as_strided(size, strides, key_offset)
                v = pool[1].index_select(0, plan.key_pages).as_strided(size, strides, key_offset)
        elif pool.is_contiguous() and not pool.storage_offset():
            k, v = pool.as_strided(size, strides, key_offset), pool.as_strided(size, strides, value_offset)
        if k is not None:
            return F.scaled_dot_product_attention(q.view(packed), k, v, scale=plan.params.sm_scale).view(flat)
    if plan.row_run is not None:
        k, v = rows_view(pool, plan.row_run, plan.num_rows, plan.max_kv)
    elif plan.kv_pages is not None:
        k, v = gather_pages(pool, plan.kv_pages, plan.num_rows, plan.max_kv)
    else:
        k, v = gather_kv(pool, plan.kv_slots, plan.num_rows, plan.max_kv)
    if plan.trim:
        k, v = k[:, :, plan.trim:], v[:, :, plan.trim:]
    if plan.causal:
        p = plan.params
        q = q.view(plan.num_rows, plan.max_q, p.num_qo_heads, p.head_dim).transpose(1, 2)  # (R, H_q, Q, D)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=p.sm_scale, enable_gqa=p.group_size > 1
        )
        return out.transpose(1, 2).reshape(-1, p.num_qo_heads, p.head_dim)
    out, _ = attend(pack_gqa(q, plan), k, v, plan.mask, plan.params)
    return unpack_gqa(out, plan)
