"""wrap/unwrap: register the paged attention and mask functions, hook the model, patch generate."""

import inspect
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import _compat, patches, refusals
from .attention import Executor, LayerParams, select_executor
from .cache import PagedCache
from .config import PagedConfig
from .errors import UnsupportedModelError
from .pool import KVPool, LayerSpec

ATTN_NAME = "hf_paged"
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
# Families that route through the attention interface but need what the executors lack.
UNSUPPORTED_MODEL_TYPES = {"gpt_oss": "attention sinks are not supported"}


@dataclass(eq=False)
class Runtime:
    """What `wrap` attaches to a model (as `model.hf_paged_runtime`)."""

    config: PagedConfig
    pool: KVPool
    executor: Executor
    original_attn_implementation: str
    layer_types: list[str] | None
    sliding_window: int | None
    forward_signature: inspect.Signature
    handles: list = field(default_factory=list)
    attention_modules: list[torch.nn.Module] = field(default_factory=list)
    cache: PagedCache | None = None
    decoder: torch.nn.Module | None = None  # the hooked module; compile.py compiles its forward
    compiled: object | None = None  # hf_paged.compile.CompiledDecode, made on first compiled generate()
    patch: object | None = None  # the hf_paged.patches module serving this family's attention, if any
    last_peak_pages: int = 0
    last_peak_shared_pages: int = 0


@dataclass(slots=True)
class PagedMask:
    """What the registered mask function returns: the arguments of a stock mask, built only on demand.

    The paged path never needs it (the cache knows each row's tokens); a forward without a
    PagedCache (training, a DynamicCache) materialises the mask of the original implementation.
    """

    args: tuple
    kwargs: dict

    def materialize(self, implementation: str):
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](*self.args, **self.kwargs)


def paged_mask(*args, **kwargs) -> PagedMask:
    return PagedMask(args, kwargs)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "hf_paged".

    query `[batch, H_q, q_len, D]`; key/value are what the cache's update returned. Returns
    `([batch, q_len, H_q, D], None)`.
    """
    runtime: Runtime | None = getattr(module, "hf_paged_runtime", None)
    cache = runtime.cache if runtime is not None else None
    if cache is None:
        return _original_attention(module, runtime, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("hf_paged does not support attention sinks")
    layer_idx = module.layer_idx
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    elif runtime.layer_types is not None and runtime.layer_types[layer_idx] == "sliding_attention":
        window = runtime.sliding_window
    else:
        window = None
    head_dim = query.shape[-1]
    params = LayerParams(
        num_qo_heads=query.shape[1],
        num_kv_heads=runtime.pool.specs[layer_idx].num_kv_heads,
        head_dim=head_dim,
        sm_scale=float(scaling) if scaling is not None else head_dim**-0.5,
        window_left=window - 1 if window else -1,
        logits_soft_cap=float(kwargs.get("softcap") or 0.0),
    )
    return cache.attend(layer_idx, query, params), None


def _original_attention(module, runtime, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """Stock attention, for forwards that run without a PagedCache."""
    implementation = runtime.original_attn_implementation if runtime is not None else "sdpa"
    if isinstance(attention_mask, PagedMask):
        mask_impl = implementation if implementation in ALL_MASK_ATTENTION_FUNCTIONS else "eager"
        attention_mask = attention_mask.materialize(mask_impl)
    if implementation == "eager":
        function = sys.modules[type(module).__module__].eager_attention_forward
    else:
        function = ALL_ATTENTION_FUNCTIONS[implementation]
    return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _register_functions() -> None:
    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_NAME, paged_mask)


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
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(name, "encoder-decoder models are not supported (decoder-only only)")
    text_config = config.get_text_config()
    model_type = getattr(text_config, "model_type", "")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(name, UNSUPPORTED_MODEL_TYPES[model_type])
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


def _layer_specs(model: torch.nn.Module, modules: dict[int, torch.nn.Module]) -> list[LayerSpec]:
    text_config = model.config.get_text_config()
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    if getattr(text_config, "multi_query", False):  # GPT-BigCode: one K/V head, no num_key_value_heads
        num_kv_heads = 1
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    specs = []
    for layer_idx in range(len(modules)):
        weight = next(modules[layer_idx].parameters())
        specs.append(LayerSpec(num_kv_heads, head_dim, weight.device, weight.dtype))
    return specs


def wrap(model: torch.nn.Module, config: PagedConfig | None = None, **overrides) -> torch.nn.Module:
    """Serve `model`'s generate() and forward from a paged KV cache. Patches in place, returns `model`.

    `config` and keyword overrides (`wrap(model, page_size=8)`) set the PagedConfig. Wrapping a
    wrapped model again with no new settings does nothing; with new settings it re-wraps.
    Raises UnsupportedModelError (model untouched) for models hf_paged cannot serve.
    """
    config = (config or PagedConfig()).with_overrides(**overrides) if overrides else (config or PagedConfig())
    runtime: Runtime | None = getattr(model, "hf_paged_runtime", None)
    if runtime is not None and runtime.config == config:
        return model
    patch = patches.find_patch(model)  # families whose attention bypasses the interface
    modules = patch.attention_modules(model) if patch else check_supported(model)
    refusals.check(model, modules, patched=patch is not None)  # structures that would give other tokens
    base = _find_decoder(model, modules)
    specs = patches.layer_specs(patch, modules) if patch else _layer_specs(model, modules)
    executor = select_executor(config.backend, specs)  # raises before anything is allocated or patched
    if runtime is not None:
        unwrap(model)
    pool = KVPool(config, specs)
    _register_functions()
    text_config = model.config.get_text_config()
    runtime = Runtime(
        config=config,
        pool=pool,
        executor=executor,
        original_attn_implementation=model.config._attn_implementation,
        layer_types=getattr(text_config, "layer_types", None),
        sliding_window=getattr(text_config, "sliding_window", None),
        forward_signature=inspect.signature(base.forward),
        patch=patch,
    )
    if patch is None:
        model.set_attn_implementation(ATTN_NAME)
    if patch is None and model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(runtime.original_attn_implementation)
        raise UnsupportedModelError(type(model).__name__, "its attention implementation cannot be replaced")
    runtime.attention_modules = list(modules.values())
    runtime.decoder = base
    for module in runtime.attention_modules:
        module.hf_paged_runtime = runtime
    if patch is not None:
        patches.install(patch, runtime.attention_modules)
    runtime.handles = [
        base.register_forward_pre_hook(_make_begin_hook(runtime), with_kwargs=True),
        base.register_forward_hook(_make_end_hook(runtime), with_kwargs=True, always_call=True),
    ]
    model.hf_paged_runtime = runtime
    from .generate import make_generate

    model.generate = make_generate(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Remove everything `wrap` added; the model behaves exactly as before. No-op if not wrapped."""
    runtime: Runtime | None = getattr(model, "hf_paged_runtime", None)
    if runtime is None:
        return model
    for handle in runtime.handles:
        handle.remove()
    patches.remove(runtime.attention_modules)
    for module in runtime.attention_modules:
        del module.hf_paged_runtime
    if runtime.patch is None:
        model.set_attn_implementation(runtime.original_attn_implementation)
    del model.hf_paged_runtime
    if "generate" in model.__dict__:
        del model.generate
    return model


def _make_begin_hook(runtime: Runtime):
    def begin_forward(module, args, kwargs):
        arguments = runtime.forward_signature.bind_partial(*args, **kwargs).arguments
        cache = _compat.find_cache(arguments)
        runtime.cache = None
        if not isinstance(cache, PagedCache):
            return None
        if cache.pool is not runtime.pool:
            raise ValueError("this PagedCache belongs to another model; create it with PagedCache(model)")
        inputs = arguments.get("input_ids")
        if inputs is None:
            inputs = arguments.get("inputs_embeds")
        if inputs is None:
            raise ValueError("hf_paged needs input_ids or inputs_embeds")
        cache.begin_forward(inputs.shape[0], inputs.shape[1], arguments.get("attention_mask"), inputs.device)
        runtime.cache = cache
        return None

    return begin_forward


def _make_end_hook(runtime: Runtime):
    def end_forward(module, args, kwargs, output):
        if runtime.cache is not None:
            runtime.cache.end_forward()
            runtime.cache = None
        return None

    return end_forward
