"""GPT-J and CodeGen where their attention computes scores itself (transformers 5.23).

Only `_attn`, the method that computes scores, is replaced: the stock forward still projects,
rotates and calls `cache.update` (PagedCache writes the pages), then calls `_attn(query, key,
value, mask)` with queries `[batch, H, q_len, D]`; the paged one attends over the pages and
returns stock's layout. (From 5.24 both route through the attention interface: no patch.)
"""

import torch

from hf_paged.attention.params import LayerParams

from . import modules_by_layer

METHOD = "_attn"


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return modules_by_layer(model, ("GPTJAttention", "CodeGenAttention"), "layer_idx", model.config.n_layer)


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    return module.num_attention_heads, module.head_dim


def paged_forward(self, paged, query, key, value, attention_mask=None):
    heads, head_dim = self.num_attention_heads, self.head_dim
    params = LayerParams(heads, heads, head_dim, 1.0 / float(self.scale_attn))
    return paged.attend(self.layer_idx, query, params).transpose(1, 2), None  # (batch, H, q_len, D)
