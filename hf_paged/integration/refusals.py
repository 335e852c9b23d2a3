"""Attention that the registered function would serve with different tokens, read off the model's structure.

`scripts/support_matrix.py` runs every causal-LM family of transformers wrapped and unwrapped;
each rule here refuses families that gave other tokens or raised in generate(), from what the
model is (its modules, parameters and config), before wrap() touches it. docs/support.md lists
what each refuses.
"""

import torch

from .. import _compat
from ..errors import UnsupportedModelError


def _attention_reason(module: torch.nn.Module, patched: bool) -> str | None:
    name = type(module).__name__
    children = dict(module.named_children())
    parameters = {key.rsplit(".", 1)[-1] for key, _ in module.named_parameters()}
    if parameters & {"sinks", "s_aux"}:
        return f"{name} has attention sinks, which are not supported"
    if "lambda_q1" in parameters:
        return f"{name} is differential attention (two softmax maps subtracted), which the executors do not compute"
    if "experts" in children:
        return f"{name} routes queries through attention experts (mixture of attention heads), not supported"
    if "dt_proj" in children:
        return f"{name} computes a dynamic attention mask from the values, not supported"
    if patched:
        return None
    causal = getattr(module, "is_causal", None)
    if causal is False:
        return f"{name} is bidirectional (is_causal=False; BERT-style: set config.is_decoder=True for a causal LM)"
    if causal is None:
        return f"{name} declares no is_causal: not a standard causal self-attention"
    return None


def check(model: torch.nn.Module, modules: dict[int, torch.nn.Module], patched: bool) -> None:
    """Raise UnsupportedModelError naming the first rule `model` breaks; return None otherwise."""
    name = type(model).__name__
    config = model.config
    text_config = config.get_text_config()
    if getattr(text_config, "cross_attention_layers", None) or getattr(text_config, "add_cross_attention", False):
        raise UnsupportedModelError(name, "cross-attention layers (to image or encoder states) are not supported")
    v_head_dim = getattr(text_config, "v_head_dim", None)
    head_dim = getattr(text_config, "head_dim", None)
    if v_head_dim is not None and head_dim is not None and v_head_dim != head_dim:
        raise UnsupportedModelError(name, f"values of head size {v_head_dim} and keys of {head_dim} are not supported")
    if getattr(config, "mm_tokens_per_image", None):
        raise UnsupportedModelError(
            name, "image tokens attend bidirectionally through a per-layer mask mapping, which the paged path ignores"
        )
    if patched and text_config.model_type == "falcon" and text_config.alibi and text_config.new_decoder_architecture:
        # The releases before 5.25 (hf_paged.patches serves Falcon there) repeat grouped K/V heads
        # before caching them on the ALiBi path, so the pool would get other shapes than it holds.
        raise UnsupportedModelError(
            name, "Falcon with ALiBi and new_decoder_architecture (grouped K/V) is supported from transformers 5.25; "
            f"this is {_compat.TRANSFORMERS_VERSION}: upgrade transformers, or use the model unwrapped"
        )
    for module in modules.values():
        reason = _attention_reason(module, patched)
        if reason is not None:
            raise UnsupportedModelError(name, reason)
