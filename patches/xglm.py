"""XGLM: fairseq-style attention (queries pre-scaled, sm_scale 1), sinusoidal positions outside attention."""

import torch

from hf_paged.attention.params import LayerParams
from hf_paged.errors import UnsupportedModelError

from . import modules_by_layer


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    if getattr(model.config, "add_cross_attention", False):
        raise UnsupportedModelError(type(model).__name__, "XGLM with cross-attention layers (add_cross_attention=True)")
    return modules_by_layer(model, ("XGLMAttention",), "layer_idx", model.config.num_layers)


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    return module.num_heads, module.head_dim


def paged_forward(self, paged, hidden_states, key_value_states=None, *args, **kwargs):
    batch, seq_len, _ = hidden_states.shape
    query = (self.q_proj(hidden_states) * self.scaling).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
    paged.update(key, value, self.layer_idx)
    params = LayerParams(self.num_heads, self.num_heads, self.head_dim, 1.0)  # the queries carry the scale
    out = paged.attend(self.layer_idx, query, params).reshape(batch, seq_len, self.embed_dim)
    return self.out_proj(out), None
