"""Dense forwards: stock's attention over K/V read back from the pages, for what paged attention
cannot express.

Paged attention stores only a row's real tokens and aligns each row's new tokens at the end of its
stored ones. That is stock's attention for every real query whatever the padding (a key the mask
drops is never stored, so never seen), but not in these cases, which a forward then runs dense:

- a padding query after a real token of its row (right padding, a hole among the new tokens):
  stock attends it to the real tokens before it, and with right padding its logits pick the
  first new token;
- a hole inside a sliding window (stock counts the window over padded positions, pages over
  stored tokens), and ALiBi counted over padded positions (MPT), once a row has a hole;
- `output_attentions=True` (stock's weights, of stock's shape), and Falcon's ALiBi, which stock
  adds to the mask rounded to bfloat16 at absolute positions (`Runtime.dense_only`).

In a dense forward each layer's `PagedCache.update` still writes the new real tokens to the pages
(pads take none) but returns what stock's cache returns: every padded position of the row,
`[batch, H_kv, past + new, D]`, past real tokens read from the pages, zeros where the mask drops a
position (never attended). The model builds stock's masks (`runtime.stock_masks`) and its layers
run the original attention implementation on them: stock's numbers, at stock's cost.

One stock behaviour needs the pads themselves: a query that sees no real key (a prompt's pad past
a sliding window, right padding) attends uniformly to every key, pads included. Pads of the running
forward are in its own K/V; past ones are zeros here. So a prompt with holes runs in one forward
(generate._can_prefill_once), as stock runs it: later queries always see at least themselves.
"""

from dataclasses import dataclass

import torch

from ..attention.torch.reads import token_rows
from ..memory.kv_quant import KVQuant, dequantize


@dataclass(slots=True)
class DensePast:
    """Where one group's stored past tokens go in the padded layout: `rows` and `positions` (both
    `[n]` int64, the padded position of each stored token) and their `slots` in the group's pages."""

    rows: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor


@dataclass(slots=True)
class DenseForward:
    """A dense forward's layout: past padded length, new tokens per row, each group's past, and
    the window stock's `DynamicCache(config)` keeps per layer (`Runtime.cache_windows`, None: all)."""

    past_length: int
    q_len: int
    pasts: list[DensePast]
    windows: list[int | None]

    def kept(self, layer_idx: int) -> int:
        """The first padded past position stock's cache still holds for this layer: a sliding
        layer (DynamicSlidingWindowLayer) keeps the last `window - 1` positions, pads included."""
        window = self.windows[layer_idx] if layer_idx < len(self.windows) else None
        return 0 if window is None else max(0, self.past_length - (window - 1))


def holes_in(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: True where a pad (0) follows a real token (1) of the same row."""
    mask = attention_mask.to(torch.int8)
    return mask.cummax(dim=1).values > mask


def needs_dense(runtime, groups, attention_mask: torch.Tensor | None, q_len: int) -> tuple[bool, bool]:
    """Whether this forward's padding needs a dense forward (see the module docstring; the other
    reasons, output_attentions and dense_only, are the caller's), and whether the mask has holes."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False, False
    holes = holes_in(attention_mask)
    hole_rows = holes.any(dim=1)
    if not bool(hole_rows.any()):
        return False, False  # left padding only: paged attention is stock's
    if bool(holes[:, -q_len:].any()) or getattr(runtime.patch, "ALIBI_OVER_PADDED_POSITIONS", False):
        return True, True
    windows = [group.window for group in groups if group.window is not None]
    padded_windows = getattr(runtime.patch, "padded_windows", None)  # a patched family's own windows (GPT-Neo)
    if padded_windows is not None:
        windows += padded_windows(runtime.decoder.config)
    if not windows:
        return False, True
    # A row's stored window covers its padded one while no hole is within a window of its queries.
    mask = attention_mask.to(torch.int8)
    first_real = mask.argmax(dim=1)
    span = attention_mask.shape[1] - first_real
    return bool((hole_rows & (span > min(windows))).any()), True


def plan_dense(group_tables, attention_mask: torch.Tensor | None, batch_size: int, q_len: int,
               past_length: int, device: torch.device, windows: list[int | None]) -> DenseForward:
    """The padded position and page slot of every stored past token, per group (before this
    forward's tokens are placed). A row's stored tokens are the mask's real past positions, the
    earliest of which a sliding window may have let go of; without such a mask (or one that
    disagrees with the pages), the row's stored tokens are taken to be its last padded positions."""
    # Each row's real past positions from one host copy of the mask (shared by every group); per row,
    # tensor ops only (no Python per token).
    reals = [None] * batch_size
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == past_length + q_len:
        reals = [row.nonzero().squeeze(1) for row in attention_mask[:, :past_length].to("cpu", torch.bool)]
    pasts = []
    for tables in group_tables:
        rows, positions, slots = [], [], []
        page_size = tables.page_size
        for row in range(batch_size):
            num_tokens = tables.num_tokens[row]
            first = tables.num_leading_holes[row] * page_size  # tokens a window let go of, whole pages
            real = reals[row]
            if real is None or real.numel() != num_tokens:
                real = torch.arange(past_length - num_tokens, past_length)
            held = torch.arange(first, num_tokens)
            table = torch.tensor(tables.page_tables[row][first // page_size:], dtype=torch.int64)
            rows.append(torch.full((held.numel(),), row, dtype=torch.int64))
            positions.append(real[first:])
            slots.append(table[held // page_size - first // page_size] * page_size + held % page_size)
        pasts.append(DensePast(*(torch.cat(v).to(device) if v else torch.zeros(0, dtype=torch.int64, device=device)
                                 for v in (rows, positions, slots))))
    return DenseForward(past_length, q_len, pasts, windows)


def padded_kv(dense: DenseForward, layer_idx: int, group: int, pool: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, quant: KVQuant | None = None):
    """Stock's cache view of one layer: `[batch, H_kv, past + q_len, D]` keys and values (from
    `dense.kept(layer_idx)` on for a sliding layer, as stock's cache), the past read from `pool`
    (the layer's `[2, pages, page_size, H_kv, D]`), this forward's `key`/`value` (`[batch, H_kv,
    q_len, D]`) at the end, zeros at the padded positions never stored (which the mask drops).
    fp8 pages (`quant`): the past dequantized, this forward's K/V rounded as the pages hold them."""
    past = dense.pasts[group]
    start = dense.kept(layer_idx)
    if start:
        keep = past.positions >= start
        past = DensePast(past.rows[keep], past.positions[keep] - start, past.slots[keep])
    batch, heads, q_len, dim = key.shape
    past_length = dense.past_length - start
    out = key.new_zeros(2, batch, past_length + q_len, heads, dim)
    if past.slots.numel():
        found = token_rows(pool)
        if found is not None:
            tokens, per_page = found
            page_size = pool.shape[2]
            slots = past.slots if per_page == page_size else past.slots // page_size * per_page + past.slots % page_size
            stored = tokens[:, slots]
        else:
            page_size = pool.shape[2]
            stored = pool[:, past.slots // page_size, past.slots % page_size]
        if quant is not None:
            k_scale, v_scale = quant.scales[layer_idx]
            stored = torch.stack([dequantize(stored[0], key.dtype, k_scale), dequantize(stored[1], key.dtype, v_scale)])
        out[:, past.rows, past.positions] = stored.to(key.dtype)
    if quant is not None:
        key, value = quant.round_trip(layer_idx, key, value)
    out[0, :, past_length:] = key.transpose(1, 2)
    out[1, :, past_length:] = value.transpose(1, 2)
    out = out.transpose(2, 3)
    return out[0], out[1]
