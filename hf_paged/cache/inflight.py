"""A prompt never holds pages past its window: sliding layers attend to the forward's own K/V.

In a forward that brings a row more tokens than a sliding-window group keeps (a prompt:
generate()'s, the prompt minus its last token that beams and samples fork from, the remainder
computed after prefix-cache hits, a user's own long chunk), the group's layers attend from the
K/V they were handed, as stock's attention does, plus the window the row held before the forward
(`Past`, gathered from its pages once per layer), and the pages get only what later queries can
still see: each row's last `window - 1` tokens, rounded out to the page that holds the first of
them (`skipped_tokens`). Stock's `DynamicSlidingWindowLayer` keeps the same window. Without this,
a prompt of n tokens would take n tokens of pages in every sliding layer until its forward ends,
which is what sizes the pool for long prompts.

Not applied (the forward writes every token and the window lets go at its end, as before):
forwards that skip nothing (decode steps, short chunks), `activate_past_recording()` (crops may
need them), and, while a split prompt is open, groups whose layers may attend wider than the
window their cache keeps (Moshi: `applies_window`), whose last prompt token sees the whole prompt.
"""

from dataclasses import dataclass

import torch

from ..attention import LayerParams
from ..attention.torch import dense
from ..memory.kv_quant import KVQuant, dequantize


def skipped_tokens(qo_lens: list[int], window: int, page_size: int, past: list[int] | None = None) -> list[int]:
    """Leading new tokens of each row (holding `past[row]` tokens, default none) that no query after
    this forward sees: the next query of a row of n tokens sees positions n - window + 1 on; the
    skip ends on a page boundary."""
    past = past or [0] * len(qo_lens)
    return [max(0, (p + n - window + 1) // page_size * page_size - p) for n, p in zip(qo_lens, past)]


def forward_skips(groups, group_tables, applies: list[bool], qo_lens: list[int], recording: bool,
                  prompt_open: bool) -> list[list[int] | None]:
    """Per group, the new tokens of each row it does not store in this forward (None: it stores all).

    `applies[g]`: group g's layers attend with its window (`applies_window`); `prompt_open`: a
    split prompt is being fed (PagedCache.prompt_phase), whose last token may see all of it.
    """
    skips: list[list[int] | None] = []
    longest = max(qo_lens, default=0)  # a row skips a token only when it brings a window of them
    for spec, tables, applied in zip(groups, group_tables, applies):
        skip = None
        if (
            spec.window is not None and longest >= spec.window and not recording
            and not (prompt_open and (spec.cache_window or not applied))
        ):
            skip = skipped_tokens(qo_lens, spec.window, spec.page_size, tables.num_tokens)
            skip = skip if any(skip) else None
        skips.append(skip)
    return skips


def applies_window(module: torch.nn.Module, window: int) -> bool:
    """Whether an attention module attends with the window its cache keeps, as far as its structure
    says: a `sliding_window` attribute of that value (Gemma 2/3, Qwen2, Cohere2 pass it down), or
    none and a forward that passes the config's window (Mistral, Phi-3, Starcoder2)."""
    value = getattr(module, "sliding_window", None)
    if value is not None or hasattr(module, "sliding_window"):
        return value == window
    return _forward_passes_window(type(module))


_PASSES: dict[type, bool] = {}


def _forward_passes_window(cls: type) -> bool:
    if cls not in _PASSES:
        import inspect

        try:
            _PASSES[cls] = "sliding_window=" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _PASSES[cls] = False
    return _PASSES[cls]


def write_index(new_mask: torch.Tensor | None, qo_lens: list[int], skip: list[int], q_len: int,
                device: torch.device) -> torch.Tensor:
    """[stored] int64 positions, in the `rows * q_len` flattening of the layer inputs, of the new
    tokens that are stored: each row's real tokens from its `skip[row]`-th on."""
    if new_mask is None:
        rank = torch.arange(q_len, device=device).expand(len(qo_lens), q_len)
        real = None
    else:
        real = new_mask.to(device)
        rank = real.long().cumsum(dim=1) - 1
    keep = rank >= torch.tensor(skip, device=device)[:, None]
    if real is not None:
        keep &= real
    return keep.reshape(-1).nonzero().squeeze(1)


@dataclass(slots=True)
class Past:
    """What a row held in a group before a forward that skips tokens there, which its queries read.

    pages[row]: the page ids holding its tokens `first[row]:num_tokens[row]` (its leading holes left
    out), taken before the forward's tokens were placed; for a row that skips nothing they are read
    again from `tables` once placed (a copy-on-write may have replaced its last page by its own).
    """

    tables: object  # tables.PageTables of the group
    pages: list[list[int]]
    first: list[int]
    num_tokens: list[int]


def pasts(group_tables, skips: list[list[int] | None]) -> list[Past | None]:
    """Per group, what its rows held before this forward when it skips tokens and some row holds
    any (None otherwise). Call before the forward's tokens are placed."""
    found: list[Past | None] = []
    for tables, skip in zip(group_tables, skips):
        past = None
        if skip is not None and any(tables.num_tokens):
            size = tables.page_size
            leads = tables.num_leading_holes
            past = Past(
                tables,
                [table[lead:] for table, lead in zip(tables.page_tables, leads)],
                [lead * size for lead in leads],
                list(tables.num_tokens),
            )
        found.append(past)
    return found


@dataclass(slots=True)
class Inflight:
    """A group attending from the forward's own K/V: `new_mask [rows, q_len]` bool of the new tokens
    (None: all are), and what its rows held before (`Past`, None: nothing)."""

    new_mask: torch.Tensor | None
    past: Past | None


@dataclass(slots=True)
class InflightPlan:
    """mask: [rows, 1 or H_kv, group * q_len, past + q_len], bool (True = attend) or ALiBi's float
    bias, for queries packed as `dense.pack_gqa` packs them (group-major within each KV head) on
    the keys of the rows' past (`past_pages`) then of the forward; `[rows, 1, q_len, past + q_len]`
    for queries one head per query head (`dense.query_layout`: several queries per row, no bias).
    past_pages: [rows * pages] int64 page ids of each row's past, padded with the pool's zero page;
    None when no row holds any. past_stored: [rows, 1, past_len, 1] bool, the slots of those pages
    that hold a token of the row (the others may hold anything, NaN included: they are zeroed)."""

    mask: torch.Tensor
    params: LayerParams
    real: torch.Tensor | None  # [rows, q_len] bool, None when every input token is new
    past_pages: torch.Tensor | None = None
    past_len: int = 0
    past_stored: torch.Tensor | None = None


def plan(new_mask: torch.Tensor | None, rows: int, q_len: int, params: LayerParams, device: torch.device,
         past: Past | None = None, zero_page: int = 0) -> InflightPlan:
    """The mask of a forward's queries on its rows' past and its own keys: causal over the real
    tokens of each row, within `params.window_left`; a pad query sees only itself (its output is
    dropped). Positions are each row's token positions (its past counted)."""
    idx = torch.arange(q_len, device=device)
    real = None if new_mask is None else new_mask.to(device)
    pos = idx.expand(rows, q_len) if real is None else real.long().cumsum(dim=1) - 1  # (R, Q) token positions
    past_pages, past_len, stored = None, 0, None
    if past is not None:
        offsets = torch.tensor(past.num_tokens, device=device)
        pos = pos + offsets[:, None]
        num_pages = max(len(pages) for pages in past.pages)
        past_len = num_pages * past.tables.page_size
        padded = [pages + [zero_page] * (num_pages - len(pages)) for pages in past.pages]
        past_pages = torch.tensor(padded, dtype=torch.long, device=device).view(-1)
        k_past = torch.tensor(past.first, device=device)[:, None] + torch.arange(past_len, device=device)  # (R, M)
    q_pos, k_pos = pos[:, :, None], pos[:, None, :]
    allowed = (idx[None, None, :] <= idx[None, :, None]).expand(rows, q_len, q_len)  # causal in the input order
    if params.window_left >= 0:
        allowed = allowed & (k_pos >= q_pos - params.window_left)
    if real is not None:
        allowed = allowed & real[:, None, :]
        allowed = allowed | (~real[:, :, None] & (idx[None, :, None] == idx[None, None, :]))
    if past is not None:
        stored = k_past < offsets[:, None]  # (R, M): a slot holding a token of the row
        seen = stored[:, None, :].expand(rows, q_len, past_len)
        if params.window_left >= 0:
            seen = seen & (k_past[:, None, :] >= q_pos - params.window_left)
        if real is not None:
            seen = seen & real[:, :, None]
        allowed = torch.cat([seen, allowed], dim=2)
        k_pos = torch.cat([k_past[:, None, :], k_pos], dim=2)
    group = params.group_size
    keys = past_len + q_len
    if params.alibi_slopes:
        slopes = torch.tensor(params.alibi_slopes, dtype=torch.float32, device=device)
        bias = slopes.view(1, params.num_kv_heads, group, 1, 1) * (k_pos - q_pos)[:, None, None].float()
        mask = bias.masked_fill(~allowed[:, None, None], float("-inf"))
        mask = mask.view(rows, params.num_kv_heads, group * q_len, keys)
    else:
        mask = allowed[:, None]
        if group > 1 and dense.query_layout(q_len, True, params):
            mask = mask.repeat(1, 1, group, 1)
    return InflightPlan(mask, params, real, past_pages, past_len, None if stored is None else stored[:, None, :, None])


def start(state, skips: list[list[int] | None], deferred: list[list[int]], new_mask: torch.Tensor | None,
          qo_lens: list[int], q_len: int, device: torch.device, group_pasts: list[Past | None] | None = None) -> None:
    """Mark the groups that skip tokens in the forward of `state` (a forward.ForwardState): their
    layers attend from the forward's own K/V and their rows' past (`pasts`, taken before the tokens
    were placed), and their metadata says which tokens to store."""
    group_pasts = group_pasts or [None] * len(skips)
    for group, (skip, pages, past) in enumerate(zip(skips, deferred, group_pasts)):
        if skip is not None:
            if past is not None:  # a row that skipped nothing still holds its past: read it as placed now
                size = past.tables.page_size
                for row, (first, count) in enumerate(zip(past.first, past.num_tokens)):
                    if not skip[row]:
                        past.pages[row] = past.tables.page_tables[row][first // size : -(-count // size)]
            state.inflight[group] = Inflight(new_mask, past)
            state.deferred[group] = pages
            state.group_metas[group].write_index = write_index(new_mask, qo_lens, skip, q_len, device)


def attend(state, layer_idx: int, group: int, query: torch.Tensor, params: LayerParams,
           pool: torch.Tensor | None = None, quant: KVQuant | None = None) -> torch.Tensor:
    """PagedCache.attend for a layer of a group in `state.inflight` (a forward.ForwardState): its
    K/V were stashed by PagedCache.update, its rows' past is read from the layer's `pool`
    `[2, pages + 1, page_size, H_kv, D]`; one plan per forward, group and layer setting. fp8 pages
    (`quant`): the past is dequantized, and the forward's own K/V rounded as the pages hold them, so
    every layer attends to the values a later step reads back."""
    key, value = state.stash.pop(layer_idx)
    if quant is not None:
        key, value = quant.round_trip(layer_idx, key, value)
    plan_key = ("inflight", query.device, params, group)
    found = state.plans.get(plan_key)
    if found is None:
        flight = state.inflight[group]
        zero_page = pool.shape[1] - 1 if pool is not None else 0
        found = state.plans[plan_key] = plan(
            flight.new_mask, query.shape[0], query.shape[2], params, query.device, flight.past, zero_page
        )
    if found.past_pages is not None:
        past_key, past_value = _past_kv(pool, found.past_pages.to(pool.device), query.shape[0], found.past_len)
        stored = found.past_stored.to(pool.device)  # a masked key is still multiplied: no stale NaN may pass
        if quant is not None:  # fp8 pages (memory/kv_quant.py)
            k_scale, v_scale = quant.scales[layer_idx]
            past_key, past_value = dequantize(past_key, key.dtype, k_scale), dequantize(past_value, key.dtype, v_scale)
        past_key, past_value = past_key.where(stored, 0.0), past_value.where(stored, 0.0)
        key = torch.cat([past_key.to(key.device, key.dtype), key], dim=2)
        value = torch.cat([past_value.to(value.device, value.dtype), value], dim=2)
    return run(query, key, value, found)


def _past_kv(pool: torch.Tensor, pages: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` of whole pages `pages [rows * length / page_size]`."""
    # Plane by plane: index_select across the planes of a packed layer's strided view (layout.py)
    # would copy the whole pool first.
    size = (rows, length, pool.shape[3], pool.shape[4])
    key, value = (plane.index_select(0, pages).view(size).transpose(1, 2) for plane in (pool[0], pool[1]))
    return key, value


def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: InflightPlan) -> torch.Tensor:
    """Attention of `query [rows, H_q, Q, D]` on `key, value [rows, H_kv, past + Q, D]` (the rows'
    past, then the forward's own K/V); returns `[rows, Q, H_q, D]`, zero at pad queries (as the
    paged path returns them)."""
    p = plan.params
    rows, _, q_len, head_dim = query.shape
    q = query  # one head per query head, as stock lays them out (dense.query_layout)
    if dense.query_layout(q_len, True, p):
        q = query.reshape(rows, p.num_kv_heads, p.group_size * q_len, head_dim)  # head h = kv * group + g
    out, _ = dense.attend(q, key.to(query.dtype), value.to(query.dtype), plan.mask, p)
    out = out.view(rows, p.num_qo_heads, q_len, head_dim).transpose(1, 2)
    if plan.real is not None:
        out = out * plan.real[:, :, None, None].to(out.dtype)
    return out
