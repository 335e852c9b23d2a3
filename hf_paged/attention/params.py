"""The per-layer settings an executor plans for."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LayerParams:
    """Attention settings of one layer. Layers with equal params share one plan per forward.

    sm_scale: softmax scale applied to q.k. window_left: a query at position p sees keys at
    positions >= p - window_left (FlashInfer's convention; -1 for no window; HF's
    `sliding_window=W` is `window_left=W-1`). logits_soft_cap: cap * tanh(s / cap) on the scores
    before masking, 0 for none (Gemma 2). alibi_slopes: one slope per query head, adding
    `slope * (key position - query position)` to the scaled scores (FlashInfer's ALiBi: positions
    of the row's stored tokens, so pads, never stored, do not count); None for none.
    """

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    window_left: int = -1
    logits_soft_cap: float = 0.0
    alibi_slopes: tuple[float, ...] | None = None
    position_bias: bool = False

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads
