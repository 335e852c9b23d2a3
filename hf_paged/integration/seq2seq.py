"""Encoder-decoder models (AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq): what wrap() finds in
them, and how their generate() gets a paged cache.

- The pool's layers are the decoder's self-attention layers 0..L-1, then its cross-attention layers
  L..2L-1 (the cross group, memory/groups.py): K/V of the encoder output, once per input (cache/cross.py).
- generate() (and Whisper's generate(), which calls it once per segment and temperature) makes its
  cache in `_prepare_cache_for_generation`: wrap() puts `PreparePagedCache` on the model instance,
  which, inside a wrapped generate() call (`session`), replaces the EncoderDecoderCache stock makes
  by a PagedEncoderDecoderCache. Every cache of the call is released when it returns.
- The encoder runs stock (its attention modules fall back to the original implementation).
"""

import contextlib
import inspect
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ..cache.cross import PagedEncoderDecoderCache
from ..cache.paged_cache import PagedCache
from ..cache.runtime import BackRefAttribute
from ..errors import UnsupportedModelError
from ..memory.groups import GroupSpec
from ..memory.pool import LayerSpec

SELF_NAMES = ("self_attn", "SelfAttention")
CROSS_NAMES = ("encoder_attn", "EncDecAttention")
TORCH_ONLY = "encoder-decoder cross-attention and T5's relative position bias run on the torch executor"


@dataclass
class Seq2SeqModules:
    """The decoder, its self- and cross-attention modules by layer, the other attention modules
    (the encoder's), and the module whose `compute_bias` gives T5's self-attention bias (or None)."""

    decoder: torch.nn.Module
    self_modules: list[torch.nn.Module]
    cross_modules: list[torch.nn.Module]
    other_modules: list[torch.nn.Module] = field(default_factory=list)
    position_bias: torch.nn.Module | None = None
    # The cross-attention projections take the encoder output's own batch (BART, T5: K/V shaped from
    # it), so the decoder may be given one row per input; Whisper's take the query's batch: every row.
    input_rows: bool = True


def find_modules(model: torch.nn.Module) -> Seq2SeqModules:
    """Raise UnsupportedModelError naming the reason, or return the model's attention modules."""
    name = type(model).__name__
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, torch.nn.Module):
        raise UnsupportedModelError(name, "an encoder-decoder model without get_decoder() is not supported")
    found: dict[str, dict[int, torch.nn.Module]] = {"self": {}, "cross": {}}
    for module_name, module in decoder.named_modules():
        last = module_name.rsplit(".", 1)[-1]
        kind = "self" if last in SELF_NAMES else "cross" if last in CROSS_NAMES else None
        layer_idx = getattr(module, "layer_idx", None)
        if kind is not None and isinstance(layer_idx, int):
            found[kind].setdefault(layer_idx, module)
    self_modules, cross_modules = found["self"], found["cross"]
    num_layers = len(self_modules)
    if not num_layers or sorted(self_modules) != list(range(num_layers)) or sorted(cross_modules) != list(range(num_layers)):
        raise UnsupportedModelError(
            name, "expected one self-attention and one cross-attention module with layer_idx 0..L-1 in every decoder layer"
        )
    modules = [self_modules[i] for i in range(num_layers)] + [cross_modules[i] for i in range(num_layers)]
    for module in modules:
        if "ALL_ATTENTION_FUNCTIONS.get_interface(" not in inspect.getsource(sys.modules[type(module).__module__]):
            raise UnsupportedModelError(name, f"{type(module).__name__} does not route through transformers' attention interface")
    biased = [m for m in modules[:num_layers] if getattr(m, "has_relative_attention_bias", False)]
    if len(biased) > 1 or (biased and biased[0] is not modules[0]):
        raise UnsupportedModelError(name, "a relative position bias in more than the first decoder layer is not supported")
    if any(getattr(m, "has_relative_attention_bias", False) for m in modules[num_layers:]):
        raise UnsupportedModelError(name, "a relative position bias in cross-attention is not supported")
    taken = {id(m) for m in modules}
    others = [
        m for m in model.modules()
        if "Attention" in type(m).__name__ and id(m) not in taken and hasattr(m, "forward")
    ]
    source = inspect.getsource(type(modules[num_layers]).forward)
    input_rows = "current_states.shape[:-1]" in source
    return Seq2SeqModules(
        decoder, modules[:num_layers], modules[num_layers:], others, biased[0] if biased else None, input_rows
    )


def check_config(model: torch.nn.Module, config, tp) -> None:
    """What hf_paged does not do on encoder-decoder models: raise before anything is touched."""
    name = type(model).__name__
    if config.compile:
        raise UnsupportedModelError(name, "compile=True is not supported on encoder-decoder models; wrap with compile=False")
    if config.prefix_cache:
        raise UnsupportedModelError(name, "the prefix cache is not supported on encoder-decoder models; wrap with prefix_cache=False")
    if tp is not None:
        raise UnsupportedModelError(name, "tensor parallelism is not supported on encoder-decoder models")


def layer_specs(modules: list[torch.nn.Module]) -> list[LayerSpec]:
    """What each attention module stores per token: heads and head size from its key projection."""
    specs = []
    for module in modules:
        head_dim = getattr(module, "head_dim", None) or getattr(module, "key_value_proj_dim", None)
        key = getattr(module, "k_proj", None) or getattr(module, "k", None)
        if not head_dim or not isinstance(key, torch.nn.Linear):
            raise UnsupportedModelError(type(module).__name__, "no key projection (k_proj or k) and head size found")
        weight = key.weight
        specs.append(LayerSpec(key.out_features // head_dim, head_dim, weight.device, weight.dtype))
    return specs


def groups(num_layers: int, page_size: int) -> list[GroupSpec]:
    """The self-attention group (layers 0..L-1), then the cross group (L..2L-1)."""
    return [
        GroupSpec(None, tuple(range(num_layers)), page_size),
        GroupSpec(None, tuple(range(num_layers, 2 * num_layers)), page_size, cross=True),
    ]


# --- generate() ----------------------------------------------------------------------------------

_SESSIONS = threading.local()  # runtime id -> the Session of this thread's running generate() call


@dataclass
class Session:
    """The caches one wrapped generate() call of an encoder-decoder model made."""

    model: torch.nn.Module
    caches: list[PagedCache] = field(default_factory=list)
    peak_pages: int = 0
    peak_kv_bytes: int = 0
    peak_group_pages: list[int] = field(default_factory=list)

    def new_cache(self, generation_config) -> PagedEncoderDecoderCache:
        """A PagedEncoderDecoderCache for one stock generate() run; the caches of the runs before
        (Whisper's segments and temperatures, which ran to their end) give their pages back first."""
        self.release()
        cache = PagedCache(self.model)
        self.caches.append(cache)
        return PagedEncoderDecoderCache(cache, cache.cross)

    def release(self) -> None:
        for cache in self.caches:
            cache.release()
            pages = cache.pages
            self.peak_pages = max(self.peak_pages, pages.peak_pool_pages)
            self.peak_kv_bytes = max(self.peak_kv_bytes, pages.peak_kv_bytes)
            if len(self.peak_group_pages) != len(pages.peak_group_pages):
                self.peak_group_pages = [0] * len(pages.peak_group_pages)
            self.peak_group_pages = [max(a, b) for a, b in zip(self.peak_group_pages, pages.peak_group_pages)]
        self.caches.clear()


def _sessions() -> dict:
    sessions = getattr(_SESSIONS, "by_runtime", None)
    if sessions is None:
        sessions = _SESSIONS.by_runtime = {}
    return sessions


@contextlib.contextmanager
def session(model: torch.nn.Module, runtime) -> Iterator[Session]:
    """While this block runs, this thread's generate() on `model` makes paged caches."""
    sessions = _sessions()
    current = Session(model)
    previous = sessions.get(id(runtime))
    sessions[id(runtime)] = current
    try:
        yield current
    finally:
        current.release()
        if previous is None:
            sessions.pop(id(runtime), None)
        else:
            sessions[id(runtime)] = previous
        runtime.last_peak_pages = current.peak_pages
        runtime.last_peak_shared_pages = 0
        runtime.last_peak_kv_bytes = current.peak_kv_bytes
        runtime.last_peak_group_pages = current.peak_group_pages


class PreparePagedCache:
    """`model._prepare_cache_for_generation` of a wrapped encoder-decoder model: stock's, then, inside a
    wrapped generate() call, its EncoderDecoderCache replaced by a PagedEncoderDecoderCache. An object
    holding the model (not a closure), so that a copy of the model carries one bound to the copy."""

    model = BackRefAttribute()  # weak: the model holds this object

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, generation_config, model_kwargs: dict, *args, **kwargs):
        model = self.model
        result = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
        current = _sessions().get(id(getattr(model, "hf_paged_runtime", None)))
        if current is None:
            return result
        for key, cache in list(model_kwargs.items()):
            if (
                type(cache) is EncoderDecoderCache
                and not getattr(cache, "_is_user_defined", False)
                and type(cache.self_attention_cache) is DynamicCache
                and type(cache.cross_attention_cache) is DynamicCache
            ):
                model_kwargs[key] = current.new_cache(generation_config)
        return result


def check_source(inputs, kwargs: dict) -> None:
    """ValueError for an empty source, before anything runs."""
    source = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("input_features"))
    if isinstance(source, torch.Tensor) and source.dim() >= 2 and source.shape[-1 if source.dim() == 2 else -1] == 0:
        raise ValueError("an encoder-decoder generate() got an empty source (no token); give every input at least one token")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel() and bool((mask.sum(dim=1) == 0).any()):
        raise ValueError(
            "an encoder-decoder generate() got an empty source (a row of attention_mask all zeros); give every "
            "input at least one token"
        )


class EmptyOutputCache:
    """`model._postprocess_outputs` of a wrapped Whisper model: Whisper's generate() splits the cache of
    each stock run's output by batch row (reading its K/V tensors); a paged run's output carries an
    EncoderDecoderCache with no tokens instead (its pages go back to the pool when the call ends)."""

    model = BackRefAttribute()  # weak: the model holds this object

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, seek_outputs, *args, **kwargs):
        model = self.model
        if not isinstance(seek_outputs, torch.Tensor):
            for key in ("cache", "past_key_values"):
                cache = seek_outputs.get(key) if hasattr(seek_outputs, "get") else None
                if isinstance(cache, PagedEncoderDecoderCache):
                    seek_outputs[key] = _empty_cache(cache)
        return type(model)._postprocess_outputs(model, seek_outputs, *args, **kwargs)


def _empty_cache(cache: PagedEncoderDecoderCache) -> EncoderDecoderCache:
    paged = cache.self_attention_cache
    rows = max(paged.batch_size, 1)
    layers = []
    for layer in range(len(paged.cross)):
        self_pool, cross_pool = paged.pool.pools[layer], paged.pool.pools[paged.cross.first_layer + layer]
        empty_self = self_pool.new_empty((rows, self_pool.shape[3], 0, self_pool.shape[4]))
        empty_cross = cross_pool.new_empty((rows, cross_pool.shape[3], 0, cross_pool.shape[4]))
        layers.append((empty_self, empty_self, empty_cross, empty_cross))
    return EncoderDecoderCache(tuple(layers))
