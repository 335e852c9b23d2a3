"""The functions wrap() registers with transformers: the "hf_paged" attention function, which
serves a forward's layers from its PagedCache (or falls back to stock attention without one), and
the mask function, which builds no mask unless a stock path asks for it."""

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import LayerParams
from ..cache.runtime import BIAS_ATTR, CACHE_KWARG, CROSS_ATTR, find_runtime, stock_mask_implementation
from ..errors import UnsupportedModelError

ATTN_NAME = "hf_paged"


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


def paged_mask(*args, **kwargs):
    """The registered mask function: a lazy PagedMask, or stock's mask inside a stock generate()."""
    implementation = stock_mask_implementation()
    if implementation is not None:
        return PagedMask(args, kwargs).materialize(_mask_implementation(implementation))
    return PagedMask(args, kwargs)


def _mask_implementation(implementation: str) -> str:
    return implementation if implementation in ALL_MASK_ATTENTION_FUNCTIONS else "eager"


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "hf_paged".

    query `[batch, H_q, q_len, D]`; key/value are what the cache's update returned. Returns
    `([batch, q_len, H_q, D], None)`.
    """
    cache = kwargs.pop(CACHE_KWARG, None)  # a PagedCache, or a compiled step's StaticDecodeCache
    if cache is None:  # a family that passes no keywords down: this thread's forward, if any
        runtime = find_runtime(module)
        cache = runtime.forward_cache() if runtime is not None else None
    if cache is None or getattr(cache, "dense_forward", False):  # no PagedCache, or a dense forward (cache/dense.py)
        return _original_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:  # wrap() refuses these; never ignore them
        raise UnsupportedModelError(type(module).__name__, "attention sinks are not supported")
    layer_idx = module.layer_idx
    cross = getattr(module, CROSS_ATTR, None)
    if cross is not None:  # an encoder-decoder model's cross-attention: its input's pages (cache/cross.py)
        params = layer_params(query.shape[1], key.shape[1], query.shape[-1], scaling, None, None)
        return cache.cross.attend(cross, query, params, kwargs.get("position_bias")), None
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else cache.layer_window(layer_idx)
    # the cache's update() returns the new K/V `[batch, H_kv, q_len, D]`
    biased = getattr(module, BIAS_ATTR, False)  # T5's decoder self-attention: the cache computes the bias
    params = layer_params(query.shape[1], key.shape[1], query.shape[-1], scaling, window, kwargs.get("softcap"), biased)
    return cache.attend(layer_idx, query, params), None


# (H_q, H_kv, D, scaling, window, softcap) -> LayerParams. Runs per layer and token: a dict lookup
# instead of building (and later hashing) a frozen dataclass, and layers with one setting get one
# object, which PagedCache.attend recognises by identity. A model has a handful of settings.
_LAYER_PARAMS: dict[tuple, LayerParams] = {}


def layer_params(num_qo_heads: int, num_kv_heads: int, head_dim: int, scaling, window, softcap,
                 position_bias: bool = False) -> LayerParams:
    """The LayerParams of an attention call (`scaling` None: `head_dim ** -0.5`; `window` None or
    0: no window; `softcap` None or 0: none; `position_bias`: T5's), one shared object per setting."""
    key = (num_qo_heads, num_kv_heads, head_dim, scaling, window, softcap, position_bias)
    params = _LAYER_PARAMS.get(key)
    if params is None:
        params = LayerParams(
            num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            sm_scale=float(scaling) if scaling is not None else head_dim**-0.5,
            window_left=window - 1 if window else -1,
            logits_soft_cap=float(softcap or 0.0),
            position_bias=position_bias,
        )
        if len(_LAYER_PARAMS) >= 1024:  # settings that keep changing (a scaling computed per call): stay bounded
            _LAYER_PARAMS.clear()
        _LAYER_PARAMS[key] = params
    return params


def _original_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """Stock attention, for forwards that run without a PagedCache."""
    runtime = find_runtime(module)  # the one thing a forward without a cache needs: what to fall back to
    implementation = runtime.original_attn_implementation if runtime is not None else "sdpa"
    if isinstance(attention_mask, PagedMask):
        attention_mask = attention_mask.materialize(_mask_implementation(implementation))
    if implementation == "eager":
        function = sys.modules[type(module).__module__].eager_attention_forward
    else:
        function = ALL_ATTENTION_FUNCTIONS[implementation]
    return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def follow_implementation_change(runtime) -> None:
    """After `config._attn_implementation = "eager"` (or `set_attn_implementation`) on a wrapped model:
    that implementation serves whatever the paged path does not (the stock fallback, dense forwards),
    and "hf_paged" is selected again, so the next forward reads the pages. Patched families keep
    their own implementation: nothing to follow."""
    if runtime.patch is not None:
        return
    model = runtime.model()
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or current == ATTN_NAME:
        return
    with runtime.lock:
        runtime.original_attn_implementation = current
        _select(model, ATTN_NAME)


@contextlib.contextmanager
def original_implementation(runtime) -> Iterator[None]:
    """Inside this block the wrapped model's config names its original attention implementation (for
    transformers' continuous batching, which picks its attention from it and refuses "hf_paged");
    "hf_paged" again after. Patched families never change theirs: nothing to do."""
    model = runtime.model()
    if runtime.patch is not None or model is None:
        yield
        return
    with runtime.lock:
        model.set_attn_implementation(runtime.original_attn_implementation)
    try:
        yield
    finally:
        with runtime.lock:
            _select(model, ATTN_NAME)


def _select(model, implementation: str) -> None:
    """`model.set_attn_implementation(implementation)`; on a model that checks implementation names
    against its own list (and refuses "hf_paged"), the config's setting directly."""
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError):
        model.config._attn_implementation = implementation


def _register_functions() -> list[dict]:
    """Register the attention and mask functions; returns the mappings this call added them to."""
    added = []
    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTN_NAME, paged_attention_forward)
        added.append(ALL_ATTENTION_FUNCTIONS._global_mapping)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_NAME, paged_mask)
        added.append(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
    return added
