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


def attend_inputs(query: torch.Tensor, pool: torch.Tensor, kv_slots: torch.Tensor | tuple[int, int], num_inputs: int,
                  width: int, runs: list[tuple[int, int, int]], masks: list[torch.Tensor | None], params: LayerParams) -> torch.Tensor:
    """`attend_rows` reading each input's K/V once: gathered per input (`row_slots` without rows), or
    read in place where `kv_slots` is the inputs' run of consecutive pages `(first, stride)`
    (unpadded inputs of one length), laid out `[H, width, D]` contiguously, and attended by all of
    that input's rows at once as a batch of stride 0 (SDPA computes each row as with its own copy:
    stock's values, bit for bit). `runs` from `row_runs`, `masks[i]` the mask of run i's rows (or None)."""
    if isinstance(kv_slots, tuple):
        k, v = rows_view(pool, kv_slots, num_inputs, width)
    else:
        k, v = gather_kv(pool, kv_slots, num_inputs, width)
    k, v = k.contiguous(), v.contiguous()
    rows, heads, q_len, dim = query.shape
    out = query.new_empty(rows, heads, q_len, v.shape[-1])
    for (index, start, end), mask in zip(runs, masks):
        count = end - start
        keys = k[index : index + 1].expand(count, -1, -1, -1)
        values = v[index : index + 1].expand(count, -1, -1, -1)
        out[start:end] = attend(query[start:end], keys, values, mask, params)[0]
    return out.transpose(1, 2)


def attend_rows(query: torch.Tensor, pool: torch.Tensor, kv_slots: torch.Tensor | tuple[int, int], width: int,
                mask: torch.Tensor | None, params: LayerParams) -> torch.Tensor:
    """Attention of `query [rows, H_q, q_len, D]` on `width` gathered keys per row (`row_slots`; or
    read in place, `kv_slots` a run of consecutive pages `(first, stride)`, rows in its order), with
    a bool `[rows, 1, q_len or 1, width]` or float mask (None: every column); returns
    `[rows, q_len, H_q, D]`, in stock's layout (one head per query head)."""
    rows = query.shape[0]
    if isinstance(kv_slots, tuple):
        k, v = rows_view(pool, kv_slots, rows, width)
    else:
        k, v = gather_kv(pool, kv_slots, rows, width)
    out, _ = attend(query, k, v, mask, params)
    return out.transpose(1, 2)
