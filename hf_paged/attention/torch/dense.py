"""The torch executor's plain path: paged attention over FlashInfer-format metadata.

Runs on any device and is the reference the FlashInfer executor is checked against. `plan()`
turns the page tables into one gather index and one mask (masks.py) per forward; `run()` gathers a layer's
K/V (reads.py) with a single `index_select` and calls SDPA (or an explicit softmax when logits are soft-capped).

SDPA is called with the query layout, mask shape and key count transformers' `sdpa_attention_forward`
passes it, so fp32 outputs are stock's bit for bit (docs/numerics.md): several queries per row go
one head per query head (`enable_gqa`, which adds in the order of stock's `repeat_kv`); one query
per row with a mask (a padded batch) has its grouped-query heads packed into the query length
(stock's `pack_gqa`). One query per row without a mask is where stock's `enable_gqa` reads each
KV head once per query head: there the queries are packed too (K/V read once per KV head, up to
twice as fast with long rows), unless the executor is `exact`. K/V are never repeated.

When the rows' pages are consecutive runs at a fixed stride (`tables.consecutive_run` on the host
page lists: rows that reserved their pages and share none) and every row holds the same number of
tokens, the K/V of all rows are a strided view of the pool: nothing is gathered.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...memory.kv_quant import dequantize
from ...memory.reservations import consecutive_run
from ..metadata import ForwardMetadata, to_device
from ..params import LayerParams
from .masks import alibi_mask, kv_gather_slots, packed_mask, padded_query_positions
from .reads import gather_kv, gather_pages, rows_view


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
    # Leading keys of every row that no query sees (a window's decode step on rows read in place):
    # read past instead of masked.
    trim: int = 0
    key_pages: torch.Tensor | None = None  # kv_pages' key half (a packed layer's pool gathers plane by plane)
    # Queries packed `[rows, H_kv, group * max_q, D]` (`pack_gqa`); False: one head per query head,
    # `[rows, H_q, max_q, D]`, with SDPA's `enable_gqa` (stock's layout; the mask is then
    # `[rows, 1, max_q, max_kv]`). The same when group is 1.
    packed: bool = True


def plan(
    meta: ForwardMetadata, params: LayerParams, zero_page_id: int, allow_causal: bool = True, exact: bool = False
) -> TorchPlan:
    """Gather indices and mask for one forward; no host sync beyond meta's host-side lists.

    Every row attends all its pages (shared prefixes included: the executor in __init__.py picks
    cascade.py instead when that pays). `allow_causal=False` always builds the mask and packs the
    queries (for callers that attend through `attend` with its LSE: cascade's suffix). `exact`:
    stock's query layout in a decode step without a mask too (`query_layout`).
    """
    rows, max_q, max_kv = meta.num_rows, meta.max_qo_len, meta.max_kv_len
    uniform_q = all(n == max_q for n in meta.qo_lens)
    # A window's decode step: each row's query sees at most its last `window_left + 1` keys, the
    # last columns of the right-aligned layout; only those are read (as many as stock's sliding
    # cache returns), the ones before are left out (`trim`, or a narrower gather) instead of masked.
    window_decode = params.window_left >= 0 and max_q == 1 and uniform_q and not params.alibi_slopes
    width = min(max_kv, params.window_left + 1) if window_decode else max_kv
    # Rows of equal length in consecutive pages: read in place. (With unequal lengths a view would
    # also read the unwritten slots before a shorter row's start; the gather reads the zero page there.)
    row_run = kv_pages = kv_slots = None
    if meta.kv_indices_host is not None and all(n == max_kv for n in meta.kv_lens):
        indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
        row_run = consecutive_run([indices[indptr[r]:indptr[r + 1]] for r in range(rows)], zero_page_id)
        if row_run is None:
            kv_pages = page_gather_index(meta, max_kv, zero_page_id)
    trim = 0
    if row_run is None and kv_pages is None:
        kv_slots = kv_gather_slots(meta, width, zero_page_id)  # right-aligned: each row's last `width`
        max_kv = width
    else:
        trim = max_kv - width
    q_positions = None if uniform_q else padded_query_positions(meta, max_q, sum(meta.qo_lens))
    # Plain causal SDPA (no mask) where stock runs it: fresh prompts of one length, no window
    # shorter than them (stock's mask skip: keys fewer than the window), no soft cap or bias.
    causal = (
        allow_causal and max_q > 1 and uniform_q and max_kv <= (params.window_left if params.window_left >= 0 else max_kv)
        and not params.logits_soft_cap and not params.alibi_slopes and all(n == max_q for n in meta.kv_lens)
        and not params.position_bias
    )
    if window_decode:  # every read column is inside the window: only a shorter row's leading columns are masked
        needs_mask = any(n < width for n in meta.kv_lens)
    else:
        needs_mask = not causal and (params.window_left >= 0 or max_q > 1 or any(n != max_kv for n in meta.kv_lens))
    needs_mask = needs_mask or params.position_bias  # the cache turns it into stock's float mask
    # Stock's mask function skips a window layer's mask only while its keys are fewer than the window.
    stock_mask = needs_mask or (window_decode and width == params.window_left + 1)
    packed = not allow_causal or query_layout(max_q, stock_mask, params, exact)
    if params.alibi_slopes:
        mask = alibi_mask(meta, max_q, max_kv, params)
    else:
        mask = packed_mask(meta, max_q, max_kv, params, packed) if needs_mask else None
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
        query = (rows, heads, params.group_size, dim) if packed else (rows, params.num_qo_heads, 1, dim)
        decode_view = (
            (rows, heads, max_kv - trim, dim), (row_stride, dim, heads * dim, 1), key_offset + skipped,
            value_offset + skipped, query, (rows, params.num_qo_heads, dim),
        )
    return TorchPlan(
        kv_slots, mask, q_positions, rows, max_q, max_kv, params, causal, row_run, kv_pages, decode_view, trim,
        key_pages, packed,
    )


def query_layout(max_q: int, has_mask: bool, params: LayerParams, exact: bool = False) -> bool:
    """Whether a forward's queries are packed (`pack_gqa`) rather than laid out one head per query head.

    As transformers' `sdpa_attention_forward` lays them out, so that SDPA adds in stock's order:
    packed for one query per row with a mask (its `pack_gqa`); one head per query head for several
    queries per row (its `repeat_kv`, or `enable_gqa` without a mask; the same sums). One query per
    row without a mask, stock's `enable_gqa` reads each KV head once per query head: packed unless
    `exact`. The explicit softmax paths (soft cap, ALiBi's bias) always pack.
    """
    if params.group_size == 1 or params.logits_soft_cap or params.alibi_slopes:
        return True
    if max_q > 1:
        return False
    return has_mask or not exact


def advance_plan(plan: TorchPlan, meta: ForwardMetadata) -> TorchPlan | None:
    """The plan of a decode step whose rows hold the pages of the forward `plan` was made for, one
    token more each (metadata.advance_metadata): only the lengths move. None when `plan` is not a
    decode step's fewest-calls plan (then `plan()` makes a new one)."""
    if plan.decode_view is None or not meta.is_decode:
        return None
    params, max_kv = plan.params, meta.max_kv_len
    if not plan.packed and 0 <= params.window_left < max_kv:  # stock's window mask appears: its layout changes
        return None
    trim = max(0, max_kv - params.window_left - 1) if params.window_left >= 0 else 0
    shift = (trim - plan.trim) * params.num_kv_heads * params.head_dim
    (rows, heads, _, dim), strides, key_offset, value_offset, packed, flat = plan.decode_view
    view = ((rows, heads, max_kv - trim, dim), strides, key_offset + shift, value_offset + shift, packed, flat)
    return TorchPlan(
        None, None, None, rows, 1, max_kv, params, False, plan.row_run, plan.kv_pages, view, trim, plan.key_pages,
        plan.packed,
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
    """[nnz, H_q, D] -> [rows, H_kv, group * max_q, D] (group-major within each KV head), or with
    `plan.packed` False -> [rows, H_q, max_q, D] (a view when no row is padded)."""
    p = plan.params
    rows, max_q = plan.num_rows, plan.max_q
    if max_q == 1 and plan.q_positions is None:  # decode: the packing is a reshape (one call, not three)
        if not plan.packed:
            return q.view(rows, p.num_qo_heads, 1, p.head_dim)
        return q.reshape(rows, p.num_kv_heads, p.group_size, p.head_dim)
    if plan.q_positions is not None:
        padded = q.new_zeros(rows * max_q, p.num_qo_heads, p.head_dim)
        q = padded.index_copy_(0, plan.q_positions, q)
    if not plan.packed:
        return q.view(rows, max_q, p.num_qo_heads, p.head_dim).transpose(1, 2)
    q = q.view(rows, max_q, p.num_kv_heads, p.group_size, p.head_dim)
    return q.permute(0, 2, 3, 1, 4).reshape(rows, p.num_kv_heads, p.group_size * max_q, p.head_dim)


def unpack_gqa(o: torch.Tensor, plan: TorchPlan) -> torch.Tensor:
    """Inverse of `pack_gqa`: [rows, H_kv, group * max_q, D] (or [rows, H_q, max_q, D]) -> [nnz, H_q, D]."""
    p = plan.params
    rows, max_q = plan.num_rows, plan.max_q
    if max_q == 1 and plan.q_positions is None:  # decode: a reshape (a view unless o is cascade's merge)
        return o.reshape(rows, p.num_qo_heads, p.head_dim)
    if plan.packed:
        o = o.view(rows, p.num_kv_heads, p.group_size, max_q, p.head_dim).permute(0, 3, 1, 2, 4)
    else:
        o = o.transpose(1, 2)
    o = o.reshape(rows * max_q, p.num_qo_heads, p.head_dim)
    return o if plan.q_positions is None else o.index_select(0, plan.q_positions)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, params: LayerParams,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention of packed queries `[R, H_kv, G*Q, D]` (or, plain SDPA only, `[R, H_q, Q, D]`:
    SDPA's `enable_gqa`) on `[R, H_kv, M, D]` K/V.

    `mask`: bool (True = attend), or a float bias (ALiBi's `alibi_mask`) added to the scaled scores.
    Returns the output and, with `return_lse`, the natural-log LSE `[R, H_kv, G*Q]` float32.
    """
    bias = mask is not None and mask.is_floating_point()
    if bias:
        mask = mask.to(q.dtype)
    if not return_lse and not params.logits_soft_cap:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=params.sm_scale, enable_gqa=gqa), None
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


def run(q: torch.Tensor, pool: torch.Tensor, plan: TorchPlan, scales: tuple[float, float] | None = None) -> torch.Tensor:
    """Attention of new tokens `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]`.

    `scales`: the layer's (k_scale, v_scale) when the pool holds fp8 (memory/kv_quant.py): the K/V
    this step reads (views or gathers of its rows' pages, never the whole pool) are dequantized."""
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
            if scales is not None:
                k, v = dequantize(k, q.dtype, scales[0]), dequantize(v, q.dtype, scales[1])
            gqa = not plan.packed  # one head per query head (stock's layout)
            return F.scaled_dot_product_attention(q.view(packed), k, v, scale=plan.params.sm_scale, enable_gqa=gqa).view(flat)
    if plan.row_run is not None:
        k, v = rows_view(pool, plan.row_run, plan.num_rows, plan.max_kv)
    elif plan.kv_pages is not None:
        k, v = gather_pages(pool, plan.kv_pages, plan.num_rows, plan.max_kv)
    else:
        k, v = gather_kv(pool, plan.kv_slots, plan.num_rows, plan.max_kv)
    if plan.trim:
        k, v = k[:, :, plan.trim:], v[:, :, plan.trim:]
    if scales is not None:
        k, v = dequantize(k, q.dtype, scales[0]), dequantize(v, q.dtype, scales[1])
    if plan.causal:
        p = plan.params
        q = q.view(plan.num_rows, plan.max_q, p.num_qo_heads, p.head_dim).transpose(1, 2)  # (R, H_q, Q, D)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=p.sm_scale, enable_gqa=p.group_size > 1
        )
        return out.transpose(1, 2).reshape(-1, p.num_qo_heads, p.head_dim)
    out, _ = attend(pack_gqa(q, plan), k, v, plan.mask, plan.params)
    return unpack_gqa(out, plan)
