"""GPT-NeoX-Japanese: fused QKV laid out per head, partial rotary, a separate dense bias returned to the layer."""

import sys

import torch

from hf_paged.attention.params import LayerParams

from . import modules_by_layer


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return modules_by_layer(model, ("GPTNeoXJapaneseAttention",), "layer_idx", model.config.num_hidden_layers)


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    return module.num_attention_heads, module.head_size


def paged_forward(self, paged, hidden_states, attention_mask=None, position_ids=None, layer_past=None,
                  use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    batch, seq_len, _ = hidden_states.shape
    qkv = self.query_key_value(hidden_states).view(batch, seq_len, self.num_attention_heads, 3 * self.head_size)
    query = qkv[..., : self.head_size].permute(0, 2, 1, 3)
    key = qkv[..., self.head_size : 2 * self.head_size].permute(0, 2, 1, 3)
    value = qkv[..., 2 * self.head_size :].permute(0, 2, 1, 3)
    rot = self.rotary_ndims
    cos, sin = position_embeddings
    query_rot, key_rot = sys.modules[type(self).__module__].apply_rotary_pos_emb(query[..., :rot], key[..., :rot], cos, sin)
    query = torch.cat((query_rot, query[..., rot:]), dim=-1)
    key = torch.cat((key_rot, key[..., rot:]), dim=-1)
    paged.update(key, value, self.layer_idx)
    params = LayerParams(self.num_attention_heads, self.num_attention_heads, self.head_size, 1.0 / self.norm_factor)
    out = paged.attend(self.layer_idx, query, params).reshape(batch, seq_len, self.hidden_size)
    return self.dense(out), None, self.dense_bias
