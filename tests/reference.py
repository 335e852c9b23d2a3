"""Dense attention in float64, the reference every executor test compares against."""

import torch


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, window_left: int = -1, soft_cap: float = 0.0
) -> torch.Tensor:
    """One row: q [Q, H_q, D] on k/v [L, H_kv, D] -> [Q, H_q, D] float32.

    Bottom-right causal (the queries are the row's last Q tokens), keys within `window_left` of
    the query when >= 0, scores soft-capped (`cap * tanh(s / cap)`) before masking when > 0.
    """
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * sm_scale
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    num_q, num_k = q.shape[0], k.shape[0]
    query_pos = torch.arange(num_k - num_q, num_k)[:, None]
    keys = torch.arange(num_k)[None]
    allowed = keys <= query_pos
    if window_left >= 0:
        allowed &= keys >= query_pos - window_left
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()
