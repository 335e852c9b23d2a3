"""wrap/unwrap: register the paged attention and mask functions (interface.py), hook the model, patch generate."""

import inspect
import sys
from collections.abc import Mapping

import torch

from .. import _compat, patches
from ..attention import select_executor
from ..cache.runtime import (
    BIAS_ATTR,
    CROSS_ATTR,
    RUNTIME_ATTR,
    BackRef,
    Runtime,
    find_runtime,
    layer_specs,
)
from ..config import PagedConfig
from ..distributed.tensor_parallel import local_specs, make_pool, tp_group
from ..errors import UnsupportedModelError
from ..memory.groups import layer_groups
from . import refusals, seq2seq
from .hooks import _make_begin_hook, _make_end_hook, encoder_hooks
from .interface import ATTN_NAME, _register_functions

SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _has_attention_sinks(module: torch.nn.Module) -> bool:
    """Whether an attention layer adds sink logits (gpt-oss's `s_aux`), which the executors cannot."""
    if getattr(module, "sinks", None) is not None:
        return True
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    # Passes sinks from somewhere other than a `sinks` attribute we could inspect.
    return ("s_aux=" in source or "sinks=" in source) and not hasattr(module, "sinks")


def _attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The attention module of each layer index (the outermost one, if several carry the index)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and "Attention" in type(module).__name__ and layer_idx not in found:
            found[layer_idx] = module
    return found


def check_supported(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Raise UnsupportedModelError naming the reason, or return the attention modules by layer."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise UnsupportedModelError(name, "not a transformers generative model (no config or generate)")
    text_config = config.get_text_config()
    if getattr(text_config, "kv_lora_rank", None):
        raise UnsupportedModelError(name, "multi-head latent attention (MLA) caches are not supported")
    if getattr(text_config, "num_kv_shared_layers", 0):
        raise UnsupportedModelError(name, "cross-layer KV sharing is not supported")
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and set(layer_types) - SUPPORTED_LAYER_TYPES:
        others = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES)
        raise UnsupportedModelError(name, f"layers of type {others} (linear attention or other) are not supported")
    modules = _attention_modules(model)
    if not modules:
        raise UnsupportedModelError(name, "no attention layers with a layer_idx were found")
    for module in modules.values():
        if _has_attention_sinks(module):
            raise UnsupportedModelError(name, f"{type(module).__name__} uses attention sinks, which are not supported")
        source = inspect.getsource(sys.modules[type(module).__module__])
        if "ALL_ATTENTION_FUNCTIONS.get_interface(" not in source:
            raise UnsupportedModelError(
                name, f"{type(module).__name__} does not route through transformers' attention interface"
            )
    num_layers = getattr(text_config, "num_hidden_layers", len(modules))
    if sorted(modules) != list(range(num_layers)):
        raise UnsupportedModelError(name, f"expected attention layers 0..{num_layers - 1}, found {sorted(modules)}")
    return modules


def _find_decoder(model: torch.nn.Module, modules: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """The innermost module that takes the KV cache and the 2-D mask and holds every attention layer.

    Its forward is where one forward of the model begins (OPTForCausalLM calls `model.decoder`
    directly, so hooking `model.base_model` would miss it).
    """
    names = {id(module): name for name, module in model.named_modules()}
    layer_names = [names[id(module)] for module in modules.values()]
    best, best_depth = None, -1
    for name, module in model.named_modules():
        try:
            parameters = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        takes_inputs = "input_ids" in parameters or "inputs_embeds" in parameters
        if not (_compat.cache_arg_name(module.forward) and "attention_mask" in parameters and takes_inputs):
            continue
        prefix = f"{name}." if name else ""
        depth = name.count(".") + 1 if name else 0
        if all(layer.startswith(prefix) for layer in layer_names) and depth > best_depth:
            best, best_depth = module, depth
    if best is None:
        raise UnsupportedModelError(
            type(model).__name__,
            f"no module's forward takes a KV cache ({' or '.join(_compat.CACHE_ARG_NAMES)}) together with "
            f"attention_mask and input_ids/inputs_embeds under transformers {_compat.TRANSFORMERS_VERSION} "
            f"(hf_paged is tested on {_compat.TESTED_RANGE}); a release that renamed these hooks needs a newer hf_paged",
        )
    return best


def wrap(model: torch.nn.Module, config: PagedConfig | Mapping | None = None, **overrides) -> torch.nn.Module:
    """Serve `model`'s generate() and forward from a paged KV cache. Patches in place, returns `model`.

    `config` (a PagedConfig or a mapping of its fields) and keyword overrides (`wrap(model,
    page_size=8)`) set the PagedConfig. Wrapping a wrapped model again with no settings, or the
    same ones, does nothing unless its attention implementation was changed since
    (`model.set_attn_implementation`, which the next forward also follows: the new one becomes the
    fallback, interface.follow_implementation_change): it re-wraps over the new one;
    with other settings it re-wraps with them (fields not given take their defaults, as on a first wrap).
    Raises UnsupportedModelError (model untouched) for models hf_paged cannot serve.
    """
    _compat.warn_if_untested()
    runtime = find_runtime(model)
    config = _requested_config(runtime, config, overrides)
    # The implementation set after an earlier wrap (model.set_attn_implementation): wrap again over it.
    changed = runtime is not None and runtime.patch is None and model.config._attn_implementation != ATTN_NAME
    if runtime is not None and runtime.config == config and not changed:
        return model
    text_config = model.config.get_text_config()
    tp = tp_group(model)  # under tensor parallelism: this rank's pool holds its local KV heads
    seq2seq_modules = None
    if _is_encoder_decoder(model):  # integration/seq2seq.py: decoder self- then cross-attention layers
        patch = None
        seq2seq.check_config(model, config, tp)
        seq2seq_modules = seq2seq.find_modules(model)
        base = seq2seq_modules.decoder
        attention_modules = seq2seq_modules.self_modules + seq2seq_modules.cross_modules
        specs = seq2seq.layer_specs(attention_modules)
        torch_only = seq2seq.TORCH_ONLY
        cache_windows = [None] * len(specs)
        groups = seq2seq.groups(len(seq2seq_modules.self_modules), config.page_size)
    else:
        patch = patches.find_patch(model)  # families whose attention bypasses the interface
        modules = patch.attention_modules(model) if patch else check_supported(model)
        refusals.check(model, modules, patched=patch is not None)  # structures that would give other tokens
        base = _find_decoder(model, modules)
        attention_modules = [modules[layer_idx] for layer_idx in range(len(modules))]
        specs = patches.layer_specs(patch, modules) if patch else layer_specs(text_config, attention_modules)
        specs = local_specs(model, specs, tp)
        torch_only = None
        # Each layer's window as stock's DynamicCache(config) keeps it. compile=True keeps one group:
        # compiled decode steps read one metadata for every layer.
        cache_windows = _compat.layer_windows(text_config, len(specs))
        grouped = [None] * len(specs) if config.compile else cache_windows
        groups = layer_groups(grouped, config.page_size, config.window_page_size)
    # Raises before anything is allocated or patched.
    executor = select_executor(config.backend, specs, config.exact, torch_only)
    # Raises (budget below one page, allocation failed) before anything is patched; on every rank under TP.
    pool = make_pool(config, specs, groups, tp)
    groups = list(pool.groups)  # with the page size each group got in the pool's layout
    original = model.config._attn_implementation  # what attention falls back to without a PagedCache
    if runtime is not None:
        original = original if changed else runtime.original_attn_implementation
        unwrap(model)
    runtime = Runtime(
        config=config,
        pool=pool,
        executor=executor,
        original_attn_implementation=original,
        layer_types=getattr(text_config, "layer_types", None),
        sliding_window=getattr(text_config, "sliding_window", None),
        forward_signature=inspect.signature(base.forward),
        decoder=base,
        attention_modules=attention_modules,
        owners=[(BackRef(owner), owner.__dict__.get("generate")) for owner in model_objects(model)],
        groups=groups,
        cache_windows=cache_windows,
        patch=patch,
        tp=tp,
        torch_only=torch_only,
        dense_only=dense_only(text_config),
    )
    if seq2seq_modules is not None:
        runtime.other_modules = seq2seq_modules.other_modules
        runtime.position_bias = seq2seq_modules.position_bias
        runtime.cross_input_rows = seq2seq_modules.input_rows
    registered = _register_functions()
    try:
        if patch is None:  # a patched family keeps its own implementation; its patch serves the pages
            model.set_attn_implementation(ATTN_NAME)
            if model.config._attn_implementation != ATTN_NAME:
                raise UnsupportedModelError(type(model).__name__, "its attention implementation cannot be replaced")
    except BaseException:
        # Leave no trace: the original implementation, and no function this call registered.
        model.set_attn_implementation(runtime.original_attn_implementation)
        for mapping in registered:
            del mapping[ATTN_NAME]
        raise
    for module in attention_modules + runtime.other_modules:
        setattr(module, RUNTIME_ATTR, BackRef(runtime))  # read only by forwards without a PagedCache
    if seq2seq_modules is not None:
        for layer, module in enumerate(seq2seq_modules.cross_modules):
            setattr(module, CROSS_ATTR, layer)
        if runtime.position_bias is not None:
            for module in seq2seq_modules.self_modules:
                setattr(module, BIAS_ATTR, True)
        model._prepare_cache_for_generation = seq2seq.PreparePagedCache(model)
        if hasattr(type(model), "_postprocess_outputs"):  # Whisper's generate() reads each run's cache
            model._postprocess_outputs = seq2seq.EmptyOutputCache(model)
    if patch is not None:
        patches.install(patch, attention_modules)
    runtime.handles = [
        base.register_forward_pre_hook(_make_begin_hook(runtime), with_kwargs=True),
        base.register_forward_hook(_make_end_hook(runtime), with_kwargs=True, always_call=True),
    ]
    if seq2seq_modules is not None and callable(getattr(model, "get_encoder", None)):
        runtime.handles += encoder_hooks(runtime, model.get_encoder())
    from .generate import make_generate

    for owner, _ in runtime.owners:
        owner = owner()
        setattr(owner, RUNTIME_ATTR, runtime)  # the one strong link to the runtime
        owner.generate = make_generate(owner)
    return model


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)) and hasattr(model, "generate")


def dense_only(text_config) -> bool:
    """Whether every forward runs dense (cache/dense.py): Falcon with ALiBi, whose bias stock adds to
    the mask rounded to bfloat16 at absolute positions, which no exact paged bias reproduces. Its
    pages hold K/V as for any model; its layers run stock attention over them."""
    return getattr(text_config, "model_type", None) == "falcon" and bool(getattr(text_config, "alibi", False))


def model_objects(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model` and the transformers model it wraps, if it is a PEFT model (`get_base_model()`).

    wrap() makes both wrapped models, on one runtime: PEFT's `merge_and_unload()` and `unload()`
    return the inner model with the hooks and the attention implementation wrap() set on it, which
    is then a wrapped model like any other (its generate() paged, `unwrap` and `memory_stats` work),
    and `unwrap` of either object unwraps both.
    """
    objects = [model]
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    if isinstance(inner, torch.nn.Module) and inner is not model and hasattr(inner, "generate"):
        objects.append(inner)
    return objects


def _requested_config(runtime: Runtime | None, config: PagedConfig | None, overrides: dict) -> PagedConfig:
    """The config `wrap` asks for: a wrapped model's own when given no settings, else `config` (or the
    defaults) with the overrides. Overrides start from the defaults, not the current config, so that
    `wrap(model, max_memory=...)` is not silently beaten by an earlier `num_pages`."""
    if config is not None and not isinstance(config, PagedConfig):
        if not isinstance(config, Mapping):
            raise TypeError(
                "wrap(model, config): expected a PagedConfig, a mapping of its fields (such as "
                f"{{'page_size': 8}}) or None, got {type(config).__name__}; keyword settings work too: "
                "wrap(model, page_size=8)"
            )
        config = PagedConfig().with_overrides(**config)  # unknown names raise TypeError listing the fields
    if runtime is not None and config is None and not overrides:
        return runtime.config
    base = config or PagedConfig()
    return base.with_overrides(**overrides) if overrides else base


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Remove everything `wrap` added; the model behaves exactly as before. No-op if not wrapped."""
    runtime = find_runtime(model)
    if runtime is None:
        return model
    pool = runtime.__dict__.get("pool")  # a copy that never generated has none
    if pool is not None and pool.prefix_cache is not None:
        pool.prefix_cache.clear()
    for handle in runtime.handles:
        handle.remove()
    patches.remove(runtime.attention_modules)
    for module in runtime.attention_modules + runtime.other_modules:
        delattr(module, RUNTIME_ATTR)
        for name in (CROSS_ATTR, BIAS_ATTR):
            if name in module.__dict__:
                delattr(module, name)
    for name, kind in (("_prepare_cache_for_generation", seq2seq.PreparePagedCache),
                       ("_postprocess_outputs", seq2seq.EmptyOutputCache)):
        if isinstance(model.__dict__.get(name), kind):
            delattr(model, name)
    model.set_attn_implementation(runtime.original_attn_implementation)
    for owner, generate in [(ref.get(), generate) for ref, generate in runtime.owners] or [(model, None)]:
        if owner is None:
            continue
        if owner.__dict__.get(RUNTIME_ATTR) is runtime:
            delattr(owner, RUNTIME_ATTR)
        if generate is not None:
            owner.generate = generate  # the user's own instance-level generate
        elif "generate" in owner.__dict__:
            del owner.generate
    return model
