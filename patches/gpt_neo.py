"""GPT-Neo: alternating global and local (windowed) layers, unscaled scores (sm_scale 1).

Stock masks a local layer's keys by padded position (`query - key < window_size`); pads sit only
before a row's first token, so the distance between two real tokens is the same without them, as
the pages store them: `window_left = window_size - 1`.
"""

import torch

from hf_paged.attention.params import LayerParams

from . import modules_by_layer


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return modules_by_layer(model, ("GPTNeoSelfAttention",), "layer_id", model.config.num_layers)


def padded_windows(config) -> list[int]:
    """The window its local layers count over padded positions (a hole inside it: a dense forward)."""
    return [config.window_size]


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    return module.num_heads, module.head_dim


def paged_forward(self, paged, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                  output_attentions=False, **kwargs):
    query = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
    key = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
    value = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
    paged.update(key, value, self.layer_id)
    window = self.config.window_size if self.attention_type == "local" else 0
    params = LayerParams(self.num_heads, self.num_heads, self.head_dim, 1.0, window - 1 if window else -1)
    out = paged.attend(self.layer_id, query, params)  # (batch, q_len, H, D)
    out = self.out_proj(out.reshape(*out.shape[:2], self.num_heads * self.head_dim))
    return self.resid_dropout(out), None
