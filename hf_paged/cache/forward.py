"""What one forward shares across layers: its metadata per group, its plans, and the window
settings layers attend with (PagedCache.begin_forward builds it, PagedCache.attend reads it)."""

from dataclasses import dataclass, field, replace

import torch

from ..attention import LayerParams
from ..attention.metadata import ForwardMetadata
from .dense import DenseForward


@dataclass(slots=True)
class ForwardState:
    """Everything one forward shares across layers: one metadata per group of layers (groups.py).

    num_written / num_attended: layers whose K/V this forward wrote / that attended through this
    cache. They differ only when the model dropped the cache keyword on its way to the attention
    function (see runtime.CACHE_KWARG): end_forward then raises instead of letting wrong tokens out.
    """

    group_metas: list[ForwardMetadata]
    prompt_last: bool = False  # the forward of the prompt's last token after a split prefill (`prompt_phase`)
    direct: bool = False  # every layer is on the device the metadata was built on: `metas` stays empty
    metas: dict[tuple[int, torch.device], ForwardMetadata] = field(default_factory=dict)
    plans: dict[tuple, object] = field(default_factory=dict)
    # (group, layer params) -> the params a layer attending wider than its group's window uses (once per forward)
    window_params: dict[tuple, LayerParams] = field(default_factory=dict)
    num_written: int = 0
    num_attended: int = 0
    # Layer -> the K/V `update` got with an autograd graph (your own forward in grad mode), until it
    # attends: the pages store them detached, and `attend`'s output refuses a backward through them.
    graph_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Sliding groups whose layers attend from the forward's own K/V and their rows' past
    # (inflight.py): group -> inflight.Inflight; their K/V by layer until it attends; pages a skip
    # took out of the tables, given back at the end of the forward (group -> pages).
    inflight: dict[int, object] = field(default_factory=dict)
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # (group, rows per page) -> `slot_mapping` as rows of a layer packed into a wider slice (steps.token_planes)
    packed_slots: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    deferred: dict[int, list[int]] = field(default_factory=dict)
    # The layer setting, group and device PagedCache.attend planned for last, with its plan and
    # metadata: the next layer with the same (the same LayerParams object: interface.layer_params
    # hands out one per setting) reuses them without hashing anything.
    last_params: LayerParams | None = None
    last_group: int = -1
    last_device: torch.device | None = None
    last_plan: object = None
    last_meta: ForwardMetadata | None = None
    # A dense forward (dense.py): each layer's update returns stock's padded K/V and its layers run
    # the original attention implementation; `masks_before`: this thread's mask setting to restore.
    dense: DenseForward | None = None
    masks_before: str | None = None

    @property
    def meta(self) -> ForwardMetadata:
        """The first group's metadata (the full-attention group when the model has one)."""
        return self.group_metas[0]


def new_tokens(
    attention_mask: torch.Tensor | None, batch_size: int, q_len: int, device: torch.device
) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """The new (non-pad) tokens of each row, their positions in the `batch * q_len` flattening
    of the layer inputs, and the `[batch, q_len]` bool mask of them (both None when every input
    token is new).

    attention_mask: the 2-D padding mask `[batch, past + q_len]` generate() passes (1 = token,
    0 = pad, anywhere: left, right or holes), or None.
    """
    if attention_mask is None:
        return [q_len] * batch_size, None, None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < q_len:
        raise ValueError(
            "hf_paged needs a 2-D padding mask of shape [batch, past + new tokens]; "
            f"got shape {tuple(attention_mask.shape)} for {q_len} new tokens"
        )
    if bool(attention_mask.all()):  # no pad at all (the common case): one call, not nine
        return [q_len] * batch_size, None, None
    new_mask = attention_mask[:, -q_len:].to(torch.bool)
    if bool(new_mask.all()):
        return [q_len] * batch_size, None, None
    return new_mask.sum(dim=1).tolist(), new_mask.reshape(-1).nonzero().squeeze(1).to(device), new_mask


def cache_window_params(cache, group: int, layer_idx: int, params: LayerParams, meta: ForwardMetadata) -> LayerParams:
    """The settings a layer attending wider than its group's window W attends with.

    Its config names a window (which stock's `DynamicCache(config)` keeps: the last W - 1 past
    tokens) that its attention does not apply (Moshi). Stock's queries then see what that cache
    returns: the last W - 1 tokens before the forward, and the forward's own tokens causally.
    - A prompt forward (or, after a split prefill, its last token's) sees the whole prompt, as
      does a forward whose rows hold at most W - 1 tokens before it: the layer's own setting.
    - One query per row: `window_left = W - 1`.
    - Several queries per row after more than W - 1 tokens (assisted decoding past the window):
      no window_left expresses that; raises rather than attending other keys.
    The group is marked `cache_window` (for later caches of the model too) the first time; if it
    has already released pages by then (before this forward), raises: they may be needed.
    """
    spec = cache.groups[group]
    window = spec.window
    if not spec.cache_window:
        # A forward whose layers attend from its own K/V (inflight.py) sees every token it skipped.
        if cache.group_tables[group].num_released and group not in cache._forward.inflight:
            raise RuntimeError(
                f"layer {layer_idx} attends with window_left={params.window_left}, but its cache group kept only "
                f"a window of {window} tokens and released the rest; this model's windows are not what "
                "its config says"
            )
        cache.groups[group] = spec = replace(spec, cache_window=True)  # the runtime's list: later caches too
    past = [n - q for n, q in zip(cache.group_tables[group].num_tokens, meta.qo_lens)]  # before this forward
    if cache.prompt_phase is not None or all(p < window for p in past):
        return params
    if meta.max_qo_len <= 1:
        return replace(params, window_left=window - 1)
    raise RuntimeError(
        f"layer {layer_idx} attends without the window of {window} tokens its cache keeps (as stock's "
        f"DynamicCache(config) keeps it); a forward of {meta.max_qo_len} tokens per row after more than "
        f"{window - 1} cannot see what stock's cache returns (assisted or prompt-lookup decoding past the "
        "window): hf_paged cannot serve it with stock's tokens; run this call on the unwrapped model"
    )

def check_compiled_window(runtime, layer_idx: int, params: LayerParams) -> None:
    """compile=True keeps every layer in one full group; a layer whose attention is wider than the
    window its config gives the cache (Moshi) would then see more than stock: raise."""
    window = runtime.cache_windows[layer_idx] if runtime.cache_windows else None
    if window is not None and not 0 <= params.window_left < window:
        raise RuntimeError(
            f"layer {layer_idx} attends without the window of {window} tokens its cache keeps (as stock's "
            "DynamicCache(config) keeps it), which compile=True (one group keeping every token) cannot "
            "reproduce; wrap with compile=False"
        )



GRADIENT_ERROR = (
    "gradients cannot flow through attention over a PagedCache: its pages hold K/V as values, without "
    "their autograd graph (generate() needs none). For gradients (training, attributions), run the forward "
    "without a PagedCache (a wrapped model then runs stock attention, also with stock's DynamicCache) or "
    "on hf_paged.unwrap(model); a decode loop that needs no gradients can run under torch.no_grad() or "
    "torch.inference_mode()"
)


class NoGradThroughPages(torch.autograd.Function):
    """`apply(out, *inputs)`: `out` itself (attention read from the pages), in the graph of `inputs`
    (the query and this layer's new K/V) so that a backward through it raises GRADIENT_ERROR instead
    of leaving out the gradient of every key and value, which stock's DynamicCache would give."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(GRADIENT_ERROR)
