"""Falcon with rotary positions: multi-head, multi-query, and `new_decoder_architecture` (grouped KV).

Stock broadcasts the grouped keys and values to every query head before caching them; the pages
hold each KV head once, in the order of stock's fused layout (query head = kv head * group + g,
the executor's grouped-query order). Only releases before 5.25 need this patch (from 5.25 Falcon
routes through the attention interface). ALiBi Falcon (Falcon-RW) runs every forward dense on
every release (hf_paged/cache/dense.py, wrap.dense_only): stock rounds its ALiBi bias to bfloat16 at
absolute positions, which an exact paged bias does not reproduce token for token; the dispatch then
runs stock's own attention over the K/V the pages return.
"""

import math
import sys

import torch

from hf_paged.attention.params import LayerParams

from . import modules_by_layer


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return modules_by_layer(model, ("FalconAttention",), "layer_idx", model.config.num_hidden_layers)


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    if module.new_decoder_architecture:
        return module.config.num_kv_heads, module.head_dim
    return (1 if module.multi_query else module.num_heads), module.head_dim


def _split(self, fused_qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[batch, H, seq, D]`, k and v `[batch, H_kv, seq, D]` (stock's split without the broadcast)."""
    batch, seq_len, _ = fused_qkv.shape
    if self.new_decoder_architecture:
        qkv = fused_qkv.view(batch, seq_len, -1, self.num_heads // self.config.num_kv_heads + 2, self.head_dim)
        query, key, value = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif self.multi_query:
        qkv = fused_qkv.view(batch, seq_len, self.num_heads + 2, self.head_dim)
        query, key, value = qkv[..., :-2, :], qkv[..., [-2], :], qkv[..., [-1], :]
    else:
        qkv = fused_qkv.view(batch, seq_len, self.num_heads, 3, self.head_dim)
        query, key, value = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def paged_forward(self, paged, hidden_states, alibi=None, attention_mask=None, position_ids=None, layer_past=None,
                  use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    batch, seq_len, _ = hidden_states.shape
    query, key, value = _split(self, self.query_key_value(hidden_states))
    cos, sin = position_embeddings
    query, key = sys.modules[type(self).__module__].apply_rotary_pos_emb(query, key, cos, sin)
    paged.update(key, value, self.layer_idx)
    params = LayerParams(self.num_heads, key.shape[1], self.head_dim, 1 / math.sqrt(self.head_dim))
    out = paged.attend(self.layer_idx, query, params).reshape(batch, seq_len, self.num_heads * self.head_dim)
    return self.dense(out), None
