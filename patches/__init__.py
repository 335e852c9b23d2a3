"""Paged attention for families whose attention bypasses transformers' `AttentionInterface`.

Installed as `hf_paged.patches` (pyproject.toml maps this folder into hf_paged's namespace, so no
top-level `patches` module lands in a user's environment).

A family module (one per model type, listed in FAMILIES) provides:

* `attention_modules(model) -> {layer index: module}`: the modules whose forward is replaced,
  raising UnsupportedModelError for a variant the patch does not serve (decided from the config
  and the modules' classes, before anything is touched);
* `kv_shape(module) -> (num_kv_heads, head_dim)`: what the layer's pool holds;
* `paged_forward(module, paged, *args, **kwargs)`: the module's forward on the paged cache,
  taking the stock forward's arguments: it computes q/k/v as stock does, writes K/V with
  `paged.update`, attends with `paged.attend` and projects the output.

A module may set `METHOD` (default "forward") to replace a smaller piece that computes scores
(GPT-J's `_attn`); `paged_forward` then takes that method's arguments.

`install` gives each attention module an instance attribute named METHOD (a `_Dispatch`)
that runs the paged version while a PagedCache drives the model and the class's own method
otherwise; `remove` deletes it, so the class's method is what the module runs again, bit for bit.
"""

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from hf_paged import _compat
from hf_paged.cache.runtime import CACHE_KWARG, BackRefAttribute, find_runtime

# model_type -> module of this package. A family is patched only where the installed release's
# modeling code does not route it through the attention interface (GPT-J and CodeGen do from 5.24).
FAMILIES = {
    "bloom": "bloom",
    "codegen": "gptj",
    "falcon": "falcon",
    "gpt_neo": "gpt_neo",
    "gpt_neox_japanese": "gpt_neox_japanese",
    "gptj": "gptj",
    "mpt": "mpt",
    "xglm": "xglm",
}


def find_patch(model: torch.nn.Module) -> ModuleType | None:
    """The patch module for `model`'s family, or None where its attention needs none (or none exists)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    name = FAMILIES.get(getattr(config.get_text_config(), "model_type", ""))
    if name is None or _compat.routes_through_interface(model):
        return None
    return importlib.import_module(f"{__name__}.{name}")


def install(patch: ModuleType, modules: list[torch.nn.Module]) -> None:
    """Replace each module's forward by the paged dispatch (each module already has `hf_paged_runtime`)."""
    for module in modules:
        setattr(module, method_name(patch), _Dispatch(module))


def remove(modules: list[torch.nn.Module]) -> None:
    """Undo `install`: the modules run their class's methods again."""
    runtime = find_runtime(modules[0]) if modules else None
    if runtime is None or runtime.patch is None:
        return
    for module in modules:
        module.__dict__.pop(method_name(runtime.patch), None)


def method_name(patch: ModuleType) -> str:
    return getattr(patch, "METHOD", "forward")


class _Dispatch:
    """A module's patched method: `module.<method>(...)` runs `_dispatch(module, ...)`. It links to the
    module weakly (a bound method stored on its own module is a reference cycle, which would keep the
    model's weights until a garbage collection); a copy of the module carries one bound to the copy."""

    module = BackRefAttribute()

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return _dispatch(self.module, *args, **kwargs)


def _dispatch(self: torch.nn.Module, *args, **kwargs):
    runtime = find_runtime(self)
    kwargs.pop(CACHE_KWARG, None)  # families that pass keywords down: the same cache as below
    cache = runtime.forward_cache()
    # No PagedCache in this forward (training, a DynamicCache), or a dense one (hf_paged/cache/dense.py:
    # the cache's update returns stock's padded K/V): stock
    if cache is None or cache.dense_forward:
        return getattr(type(self), method_name(runtime.patch))(self, *args, **kwargs)
    return runtime.patch.paged_forward(self, cache, *args, **kwargs)


def layer_specs(patch: ModuleType, modules: dict[int, torch.nn.Module]) -> list:
    """The pool layout of each layer: the patch's K/V shape, the layer's device and dtype."""
    from hf_paged.memory.pool import LayerSpec

    specs = []
    for layer_idx in range(len(modules)):
        weight = next(modules[layer_idx].parameters())
        specs.append(LayerSpec(*patch.kv_shape(modules[layer_idx]), weight.device, weight.dtype))
    return specs


def cached_slopes(module: torch.nn.Module, compute: Callable[[], list[float]]) -> tuple[float, ...]:
    """A module's ALiBi slopes, computed once by `compute()` (each family reads stock's its own way)
    and kept on the module."""
    slopes = module.__dict__.get("_hf_paged_slopes")
    if slopes is None:
        slopes = module.__dict__["_hf_paged_slopes"] = tuple(compute())
    return slopes


def modules_by_layer(
    model: torch.nn.Module, classes: tuple[str, ...], index_attr: str, num_layers: int
) -> dict[int, torch.nn.Module]:
    """The modules of the named classes by their layer index, all of layers 0..num_layers-1.

    Raises UnsupportedModelError naming the class found when a layer's module subclasses a named
    class (an attention implementation the patch does not know, such as a flash-attention one).
    """
    from hf_paged.errors import UnsupportedModelError

    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        index = getattr(module, index_attr, None)
        bases = {cls.__name__ for cls in type(module).__mro__}
        if not isinstance(index, int) or index in found or not bases & set(classes):
            continue
        if type(module).__name__ not in classes:  # a subclass: another attention implementation
            raise UnsupportedModelError(
                type(model).__name__, f"{type(module).__name__} has no hf_paged patch (patched: {', '.join(classes)})"
            )
        found[index] = module
    if sorted(found) != list(range(num_layers)):
        raise UnsupportedModelError(type(model).__name__, f"expected attention layers 0..{num_layers - 1}, found {sorted(found)}")
    return found
