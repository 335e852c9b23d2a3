"""MPT: ALiBi (stock's `build_mpt_alibi_tensor` slopes), optional `clip_qkv`, custom softmax scale.

Stock adds `slope * (key - last key)` over padded positions; the executor adds `slope * (key -
query)` over stored tokens. Per query row the two differ by a constant, which softmax cancels.
"""

import sys

import torch

from hf_paged.attention.params import LayerParams

from . import cached_slopes, modules_by_layer

# No position but ALiBi's, which the paged attention counts over each row's stored tokens: a row
# continued from the prefix cache's pages needs no `position_ids` (MPT's forward takes none).
POSITIONS_FROM_STORED_TOKENS = True
# But stock's bias counts padded positions: once a row has a hole (right padding, pads between real
# tokens) they differ by more than a constant, and those forwards run dense (hf_paged/cache/dense.py).
ALIBI_OVER_PADDED_POSITIONS = True


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return modules_by_layer(model, ("MptAttention",), "layer_idx", model.config.n_layers)


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    return module.n_heads, module.head_dim


def alibi_slopes(module: torch.nn.Module) -> tuple[float, ...]:
    """Stock's slopes, read off its bias over two positions (`[-slope, 0]` per head)."""
    build = sys.modules[type(module).__module__].build_mpt_alibi_tensor
    return cached_slopes(module, lambda: (-build(module.n_heads, 2)[:, 0, 0]).tolist())  # bias (H, 1, 2)


def paged_forward(self, paged, hidden_states, position_bias=None, *args, **kwargs):
    batch_size, seq_length = hidden_states.shape[:2]
    mixed_qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (
        states.reshape(batch_size, seq_length, self.n_heads, self.head_dim).transpose(1, 2)
        for states in mixed_qkv.chunk(3, dim=2)
    )
    paged.update(key, value, self.layer_idx)
    slopes = alibi_slopes(self) if position_bias is not None else None
    params = LayerParams(self.n_heads, self.n_heads, self.head_dim, float(self.softmax_scale), alibi_slopes=slopes)
    context = paged.attend(self.layer_idx, query, params).reshape(batch_size, seq_length, -1)
    return self.out_proj(context), None
