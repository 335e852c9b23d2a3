"""Index and mask tensors of the torch executor, derived from FlashInfer-format metadata on device.

Each row's key slots in the pool (`token_slots`, `kv_gather_slots`), where its new tokens sit in the
padded query layout (`padded_query_positions`), and which keys each query sees: bottom-right causal,
an optional left window, ALiBi's bias (`attention_mask`, `packed_mask`, `alibi_mask`).

Rows shorter than the longest are right-aligned in the padded layouts: a row's keys are the last of
its `max_kv` columns and its new tokens the last of its `max_q` query rows. That is where stock's
left-padded cache holds them, so SDPA adds the same scores in the same order and a padded batch's
fp32 outputs are stock's bit for bit (docs/numerics.md); the leading columns read the zero page
and are masked.
"""

import torch

from ..metadata import ForwardMetadata
from ..params import LayerParams


def kv_lengths(meta: ForwardMetadata) -> torch.Tensor:
    """[rows] int64 KV length of each row from `kv_indptr` and `kv_last_page_len`."""
    num_pages = (meta.kv_indptr[1:] - meta.kv_indptr[:-1]).long()
    lengths = (num_pages - 1) * meta.page_size + meta.kv_last_page_len.long()
    return torch.where(num_pages > 0, lengths, torch.zeros_like(lengths))


def token_slots(meta: ForwardMetadata, max_kv: int, zero_slot: int) -> torch.Tensor:
    """[rows, max_kv] int64 key slots (indices into `pool.view(-1, H, D)`) of each row's tokens,
    right-aligned: column `j` holds token `j - (max_kv - kv_len)`.

    The leading columns of a shorter row point at `zero_slot`.
    """
    page_size = meta.page_size
    device = meta.kv_indptr.device
    positions = torch.arange(max_kv, device=device)  # (M,)
    tokens = positions[None] - (max_kv - kv_lengths(meta))[:, None]  # (R, M) token index of each column
    valid = tokens >= 0
    tokens = tokens.clamp(min=0)
    page_pos = meta.kv_indptr[:-1, None].long() + tokens // page_size  # (R, M)
    num_indices = meta.kv_indices.numel()
    if num_indices == 0:
        return torch.full(valid.shape, zero_slot, dtype=torch.long, device=device)
    page_ids = meta.kv_indices.long()[page_pos.clamp(max=num_indices - 1)]
    slots = page_ids * page_size + tokens % page_size
    return torch.where(valid, slots, torch.full_like(slots, zero_slot))


def attention_mask(
    meta: ForwardMetadata, max_q: int, max_kv: int, window_left: int
) -> torch.Tensor:
    """[rows, max_q, max_kv] bool: query row i of row r sees key column `j` (both right-aligned:
    `token_slots`, `padded_query_positions`).

    Bottom-right causal (a row's new tokens are the last of its KV), optional left window.
    Padded queries (the leading `max_q - qo_len` rows) see every real key, so they never produce NaN.
    """
    device = meta.kv_indptr.device
    kv_len = kv_lengths(meta)  # (R,)
    qo_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).long()
    keys = torch.arange(max_kv, device=device)[None, None]  # (1, 1, M)
    query_rows = torch.arange(max_q, device=device)[None, :, None]  # (1, Q, 1)
    query_col = query_rows + (max_kv - max_q)  # the key column of each query's own token
    real_key = keys >= (max_kv - kv_len)[:, None, None]  # (R, 1, M)
    mask = (keys <= query_col) & real_key
    if window_left >= 0:
        mask &= keys >= query_col - window_left
    padded_query = query_rows < (max_q - qo_len)[:, None, None]  # (R, Q, 1)
    return mask | (padded_query & real_key)


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
    """[nnz] int64 position of each new token in the `rows * max_q` padded layout (right-aligned:
    a row's tokens are the last of its `max_q`)."""
    qo_len = (index.qo_indptr[1:] - index.qo_indptr[:-1]).long()
    device = qo_len.device
    row_of = torch.repeat_interleave(torch.arange(qo_len.numel(), device=device), qo_len, output_size=nnz)
    within = torch.arange(nnz, device=device) - index.qo_indptr[:-1].long()[row_of]
    return row_of * max_q + (max_q - qo_len)[row_of] + within


def packed_mask(index, max_q: int, max_kv: int, params: LayerParams, packed: bool = True) -> torch.Tensor:
    """[rows, 1, group * max_q (or 1), max_kv] bool mask for `pack_gqa`-packed queries; with
    `packed=False`, [rows, 1, max_q, max_kv] for queries one head per query head (stock's layout)."""
    mask = attention_mask(index, max_q, max_kv, params.window_left)[:, None]  # (R, 1, Q, M)
    if packed and max_q > 1 and params.group_size > 1:
        mask = mask.repeat(1, 1, params.group_size, 1)
    return mask


def alibi_mask(index, max_q: int, max_kv: int, params: LayerParams) -> torch.Tensor:
    """[rows, H_kv, group * max_q, max_kv] float32: `slope * (key - query)` where `packed_mask`
    attends, -inf elsewhere, in `pack_gqa`'s head order (query head = kv head * group + g)."""
    allowed = attention_mask(index, max_q, max_kv, params.window_left)  # (R, Q, M)
    device = allowed.device
    # Right-aligned columns: query row i's own token is key column `max_kv - max_q + i` in every row.
    query_col = torch.arange(max_q, device=device) + (max_kv - max_q)
    distance = (torch.arange(max_kv, device=device)[None] - query_col[:, None]).expand_as(allowed)  # (R, Q, M)
    slopes = torch.tensor(params.alibi_slopes, dtype=torch.float32, device=device)
    bias = slopes.view(1, params.num_kv_heads, params.group_size, 1, 1) * distance[:, None, None].float()
    bias = bias.masked_fill(~allowed[:, None, None], float("-inf"))  # (R, H_kv, G, Q, M)
    return bias.view(bias.shape[0], params.num_kv_heads, params.group_size * max_q, max_kv)
