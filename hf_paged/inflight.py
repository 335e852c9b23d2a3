"""A prompt never holds pages past its window: sliding layers attend to the forward's own K/V.

In a forward whose rows hold nothing yet in a sliding-window group (a prompt: generate()'s, or the
prompt minus its last token that beams and samples fork from), the group's layers attend from
the K/V they were handed, as stock's attention does, and the pages get only what later queries
can still see: each row's last `window - 1` tokens, rounded out to the page that holds the first
of them (`skipped_tokens`). Stock's `DynamicSlidingWindowLayer` keeps the same window. Without
this, a prompt of n tokens would take n tokens of pages in every sliding layer until its forward
ends, which is what sizes the pool for long prompts.

Not applied (the forward writes every token and the window lets go at its end, as before): rows
that hold tokens already (a forward continuing from the prefix cache, assisted decoding, a user's
own chunked prefill), `activate_past_recording()` (crops may need them), and, while a split
prompt is open, groups whose layers may attend wider than the window their cache keeps (Moshi:
`applies_window`), whose last prompt token sees the whole prompt.
"""

from dataclasses import dataclass

import torch

from .attention import LayerParams
from .attention.torch import dense


def skipped_tokens(qo_lens: list[int], window: int, page_size: int) -> list[int]:
    """Leading new tokens of each (empty) row that no query after this forward sees: the next query
    of a row of n tokens sees positions n - window + 1 on; the skip ends on a page boundary."""
    return [max(0, (n - window + 1) // page_size * page_size) for n in qo_lens]


def forward_skips(groups, group_tables, applies: list[bool], qo_lens: list[int], recording: bool,
                  prompt_open: bool) -> list[list[int] | None]:
    """Per group, the new tokens of each row it does not store in this forward (None: it stores all).

    `applies[g]`: group g's layers attend with its window (`applies_window`); `prompt_open`: a
    split prompt is being fed (PagedCache.prompt_phase), whose last token may see all of it.
    """
    skips: list[list[int] | None] = []
    for spec, tables, applied in zip(groups, group_tables, applies):
        skip = None
        if (
            spec.window is not None and not recording and not any(tables.num_tokens)
            and not (prompt_open and (spec.cache_window or not applied))
        ):
            skip = skipped_tokens(qo_lens, spec.window, spec.page_size)
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
class InflightPlan:
    """mask: [rows, 1 or H_kv, group * q_len, q_len], bool (True = attend) or ALiBi's float bias,
    for queries packed as `dense.pack_gqa` packs them (group-major within each KV head)."""

    mask: torch.Tensor
    params: LayerParams
    real: torch.Tensor | None  # [rows, q_len] bool, None when every input token is new


def plan(new_mask: torch.Tensor | None, rows: int, q_len: int, params: LayerParams, device: torch.device) -> InflightPlan:
    """The mask of a forward's queries on its own keys: causal over the real tokens of each row,
    within `params.window_left`; a pad query sees only itself (its output is dropped)."""
    idx = torch.arange(q_len, device=device)
    real = None if new_mask is None else new_mask.to(device)
    pos = idx.expand(rows, q_len) if real is None else real.long().cumsum(dim=1) - 1  # (R, Q) token positions
    q_pos, k_pos = pos[:, :, None], pos[:, None, :]
    allowed = (idx[None, None, :] <= idx[None, :, None]).expand(rows, q_len, q_len)  # causal in the input order
    if params.window_left >= 0:
        allowed = allowed & (k_pos >= q_pos - params.window_left)
    if real is not None:
        allowed = allowed & real[:, None, :]
        allowed = allowed | (~real[:, :, None] & (idx[None, :, None] == idx[None, None, :]))
    group = params.group_size
    if params.alibi_slopes:
        slopes = torch.tensor(params.alibi_slopes, dtype=torch.float32, device=device)
        bias = slopes.view(1, params.num_kv_heads, group, 1, 1) * (k_pos - q_pos)[:, None, None].float()
        mask = bias.masked_fill(~allowed[:, None, None], float("-inf"))
        mask = mask.view(rows, params.num_kv_heads, group * q_len, q_len)
    else:
        mask = allowed[:, None]
        if group > 1:
            mask = mask.repeat(1, 1, group, 1)
    return InflightPlan(mask, params, real)


def start(state, skips: list[list[int] | None], deferred: list[list[int]], new_mask: torch.Tensor | None,
          qo_lens: list[int], q_len: int, device: torch.device) -> None:
    """Mark the groups that skip tokens in the forward of `state` (a forward.ForwardState): their
    layers attend from the forward's own K/V, and their metadata says which tokens to store."""
    for group, (skip, pages) in enumerate(zip(skips, deferred)):
        if skip is not None:
            state.inflight[group] = new_mask
            state.deferred[group] = pages
            state.group_metas[group].write_index = write_index(new_mask, qo_lens, skip, q_len, device)


def attend(state, layer_idx: int, group: int, query: torch.Tensor, params: LayerParams) -> torch.Tensor:
    """PagedCache.attend for a layer of a group in `state.inflight` (a forward.ForwardState): its
    K/V were stashed by PagedCache.update; one plan per forward, group and layer setting."""
    key, value = state.stash.pop(layer_idx)
    plan_key = ("inflight", query.device, params, group)
    found = state.plans.get(plan_key)
    if found is None:
        found = state.plans[plan_key] = plan(state.inflight[group], query.shape[0], query.shape[2], params, query.device)
    return run(query, key, value, found)


def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: InflightPlan) -> torch.Tensor:
    """Attention of `query [rows, H_q, Q, D]` on the forward's own `key, value [rows, H_kv, Q, D]`;
    returns `[rows, Q, H_q, D]`, zero at pad queries (as the paged path returns them)."""
    p = plan.params
    rows, _, q_len, head_dim = query.shape
    q = query.reshape(rows, p.num_kv_heads, p.group_size * q_len, head_dim)  # head h = kv * group + g
    out, _ = dense.attend(q, key.to(query.dtype), value.to(query.dtype), plan.mask, p)
    out = out.view(rows, p.num_qo_heads, q_len, head_dim).transpose(1, 2)
    if plan.real is not None:
        out = out * plan.real[:, :, None, None].to(out.dtype)
    return out
