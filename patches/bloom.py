"""Bloom: ALiBi, fused QKV, full multi-head attention.

Stock adds `slope * (index of the key among the row's real tokens)` to the scaled scores; the
executor adds `slope * (key - query)` over the stored tokens (pads are never stored). The two
differ by a constant per query row, which softmax cancels.
"""

import sys

import torch
import torch.nn.functional as F

from hf_paged.attention.params import LayerParams

from . import cached_slopes, modules_by_layer

# No position but ALiBi's, which the paged attention counts over each row's stored tokens: a row
# continued from the prefix cache's pages needs no `position_ids` (Bloom's forward takes none).
POSITIONS_FROM_STORED_TOKENS = True


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return modules_by_layer(model, ("BloomAttention",), "layer_idx", model.config.n_layer)


def kv_shape(module: torch.nn.Module) -> tuple[int, int]:
    return module.num_heads, module.head_dim


def alibi_slopes(module: torch.nn.Module) -> tuple[float, ...]:
    """The slopes stock uses (its own `_get_alibi_slopes`)."""
    stock = sys.modules[type(module).__module__]._get_alibi_slopes
    return cached_slopes(module, lambda: stock(module.num_heads, "cpu").tolist())


def paged_forward(self, paged, hidden_states, residual, *args, **kwargs):
    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # 3 x (batch, H, q_len, D)
    paged.update(key, value, self.layer_idx)
    params = LayerParams(
        self.num_heads, self.num_heads, self.head_dim, self.inv_norm_factor, alibi_slopes=alibi_slopes(self)
    )
    context = paged.attend(self.layer_idx, query, params).reshape(batch_size, q_length, self.hidden_size)
    if self.pretraining_tp > 1 and self.slow_but_exact:  # as stock: the output projection in slices
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            output = output + F.linear(
                context[:, :, int(i * slices) : int((i + 1) * slices)],
                self.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
            )
    else:
        output = self.dense(context)
    output = sys.modules[type(self).__module__].dropout_add(output, residual, self.hidden_dropout, self.training)
    return output, None
