"""Attention that is not causal self-attention: an encoder-decoder model's cross-attention (keys
the same for every row of one input) and T5's relative position bias (a float mask).

Cross-attention keys sit where stock's cache holds them: column `c` of a row is the source token at
`c` of the padded encoder output (`width` columns), so a right-padded batch (as seq2seq tokenizers
pad) has each input's tokens in its leading columns and its pads masked, and SDPA adds the same
scores in the same order as stock's (fp32 bit for bit). Pad columns read the zero page.
"""

import torch

from ..params import LayerParams
from .dense import attend
from .reads import gather_kv, rows_view


def input_slots(pages: list[list[int]], lengths: list[int], offsets: list[int], width: int, page_size: int,
                zero_slot: int) -> torch.Tensor:
    """[inputs, width] int64 slots of each input's source tokens in stock's columns: token t of
    input i (in pages `pages[i]`) at column `offsets[i] + t`; the zero page's slot elsewhere."""
    slots = torch.full((len(pages), width), zero_slot, dtype=torch.int64)
    for row, (table, length, offset) in enumerate(zip(pages, lengths, offsets)):
        tokens = torch.arange(length)
        page_ids = torch.tensor(table, dtype=torch.int64)[tokens // page_size]
        slots[row, offset:offset + length] = page_ids * page_size + tokens % page_size
    return slots


def row_slots(slots: torch.Tensor, row_input: torch.Tensor | None, zero_page_id: int, page_size: int) -> torch.Tensor:
    """[2 * rows * width] slots (keys, then values) of every row's input (`row_input` None: of every
    input once): the gather index `gather_kv` takes."""
    keys = (slots if row_input is None else slots.index_select(0, row_input)).reshape(-1)
    return torch.cat([keys, keys + (zero_page_id + 1) * page_size])


def row_runs(row_input: list[int]) -> list[tuple[int, int, int]] | None:
    """(input, first row, end row) of each run of rows reading one input, when every input's rows are
    one run (beams and samples of an input stay together); else None."""
    runs: list[tuple[int, int, int]] = []
    for row, index in enumerate(row_input):
        if runs and runs[-1][0] == index:
            runs[-1] = (index, runs[-1][1], row + 1)
        else:
            runs.append((index, row, row + 1))
    return runs if len({index for index, _, _ in runs}) == len(runs) else None


def float_mask(mask: torch.Tensor | None, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stock's SDPA mask with a position bias (transformers' `create_position_bias_mask`): the bias
    where `mask` attends, the dtype's lowest value elsewhere; the bias itself without a mask."""
    if mask is None:
        return bias
    return torch.where(mask, bias, torch.finfo(dtype).min).contiguous()


def head_major_index(pages: list[list[int]], lengths: list[int], offsets: list[int], width: int, page_size: int,
                     heads: int, zero_row: int) -> torch.Tensor:
    """[inputs, heads, width] int64 rows of a layer plane's `[tokens * heads, D]` view holding input i's
    head h at column c in the head-major layout of its run of consecutive pages (`write_head_major`);
    the zero page's first row for pad columns."""
    index = torch.full((len(pages), heads, width), zero_row, dtype=torch.int64)
    for row, (table, length, offset) in enumerate(zip(pages, lengths, offsets)):
        capacity = len(table) * page_size
        base = table[0] * page_size * heads
        index[row, :, offset:offset + length] = base + torch.arange(heads)[:, None] * capacity + torch.arange(length)[None]
    return index


def write_head_major(pool: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pages: list[list[int]],
                     lengths: list[int], offsets: list[int]) -> None:
    """Write each input's K/V `[inputs, H, width, D]` into its run of consecutive pages as `[H, tokens, D]`
    (head-major: every head's keys contiguous, the layout SDPA reads fastest). The run's pages hold this
    input only, so the layout inside them is the cross-attention's own; a contiguous layer pool."""
    _, _, page_size, heads, dim = pool.shape
    page = page_size * heads * dim
    planes = pool.view(2, -1)
    for row, (table, length, offset) in enumerate(zip(pages, lengths, offsets)):
        first, count = table[0], len(table)
        for plane, source in ((0, keys), (1, values)):
            region = planes[plane, first * page:(first + count) * page].view(heads, count * page_size, dim)
            region[:, :length] = source[row, :, offset:offset + length]


def gather_head_major(pool: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[count, H, width, D]` (contiguous) of `index [count, H, width]` (`head_major_index`)."""
    dim = pool.shape[-1]
    flat = pool.view(-1, dim)
    plane_rows = pool.shape[1] * pool.shape[2] * pool.shape[3]
    rows = index.reshape(-1)
    kv = flat.index_select(0, torch.cat([rows, rows + plane_rows]))
    return kv.view(2, *index.shape, dim).unbind(0)


def view_head_major(pool: torch.Tensor, run: tuple[int, int], count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[count, H, width, D]` of unpadded inputs of `width` tokens written head-major into
    runs of pages at `run = (first page, stride)`: views of the pool, no copy."""
    _, _, page_size, heads, dim = pool.shape
    page = page_size * heads * dim
    first, stride = run
    capacity = -(-width // page_size) * page_size
    size, strides = (count, heads, width, dim), (stride * page, capacity * dim, dim, 1)
    offset = pool.storage_offset() + first * page
    return pool.as_strided(size, strides, offset), pool.as_strided(size, strides, offset + pool.stride(0))


def attend_inputs(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]],
                  masks: list[torch.Tensor | None], params: LayerParams) -> torch.Tensor:
    """Cross-attention of `query [rows, H_q, q_len, D]` on each input's K/V `[inputs, H, width, D]`,
    read once and attended by all of that input's rows at once as a batch of stride 0 (SDPA computes
    each row as with its own copy: stock's values, bit for bit). `runs` from `row_runs`, `masks[i]` the
    mask of run i's rows (or None). Returns `[rows, q_len, H_q, D]`."""
    rows, heads, q_len, _ = query.shape
    out = query.new_empty(rows, heads, q_len, v.shape[-1])
    for (index, start, end), mask in zip(runs, masks):
        count = end - start
        keys = k[index : index + 1].expand(count, -1, -1, -1)
        values = v[index : index + 1].expand(count, -1, -1, -1)
        out[start:end] = attend(query[start:end], keys, values, mask, params)[0]
    return out.transpose(1, 2)


def attend_rows(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                params: LayerParams) -> torch.Tensor:
    """Attention of `query [rows, H_q, q_len, D]` on each row's own K/V `[rows, H, width, D]`, with a
    bool `[rows, 1, q_len or 1, width]` or float mask (None: every column); returns
    `[rows, q_len, H_q, D]`, in stock's layout (one head per query head)."""
    out, _ = attend(query, k, v, mask, params)
    return out.transpose(1, 2)
