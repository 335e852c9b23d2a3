"""Runtime: what `wrap()` attaches to a model, below the cache (it knows pools and executors, not caches).

One Runtime per wrapped model, shared by every PagedCache on it and by every thread that calls
generate(). It never holds a "current cache": each forward gets its cache through the forward's
keyword arguments (see CACHE_KWARG), so concurrent calls cannot see each other's caches.

The model is reached from user code only through `runtime_of(model)` (the `hf_paged_runtime`
attribute is where wrap() puts it); everything below that gets the runtime, or the cache, passed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..attention import Executor, select_executor
from ..config import PagedConfig
from ..distributed.tensor_parallel import TPGroup, make_pool
from ..memory.pool import KVPool, LayerSpec

RUNTIME_ATTR = "hf_paged_runtime"
# Set by wrap() on an encoder-decoder model's attention modules: a cross-attention module's decoder
# layer (its pages: cache/cross.py), and True on T5-style decoder self-attention that adds a
# relative position bias (the cache computes it: `Runtime.position_bias`).
CROSS_ATTR = "hf_paged_cross_layer"
BIAS_ATTR = "hf_paged_position_bias"
# How a forward's PagedCache reaches the attention function: the decoder's pre-hook adds it to the
# forward's keyword arguments, which every tested family passes down (decoder -> layer -> attention
# module -> attention function; checked on transformers 5.23 and 5.24). The alternatives, a cache
# attribute on the model or a per-thread context variable, are state that the compiled path would
# have to swap; a keyword is an argument like any other, so two calls on two threads, or a compiled
# step (which passes its StaticDecodeCache the same way), can never see each other's cache. A model
# that drops the keyword is caught by PagedCache.end_forward (layers wrote K/V but none attended).
CACHE_KWARG = "hf_paged_cache"

# A stock generate() on a wrapped model (use_cache=False, a cache_implementation) needs stock's
# masks as the model builds them (a static cache pre-builds masks that the model reads as tensors).
# Switching the model's attention implementation would switch it for other threads' paged calls
# too; instead this thread's mask function builds the original implementation's masks while the
# call runs (`stock_masks`), and attention without a PagedCache runs stock anyway.
_STOCK_MASKS = threading.local()


@contextlib.contextmanager
def stock_masks(implementation: str) -> Iterator[None]:
    """Inside this block, this thread's hf_paged mask function returns `implementation`'s masks."""
    previous = getattr(_STOCK_MASKS, "implementation", None)
    _STOCK_MASKS.implementation = implementation
    try:
        yield
    finally:
        _STOCK_MASKS.implementation = previous


def set_stock_masks(implementation: str | None) -> str | None:
    """Make this thread's mask function return `implementation`'s masks (None: the lazy paged
    mask) until set again; returns the setting it replaced (a dense forward, cache/dense.py)."""
    previous = getattr(_STOCK_MASKS, "implementation", None)
    _STOCK_MASKS.implementation = implementation
    return previous


def stock_mask_implementation() -> str | None:
    """The implementation whose masks this thread builds now (`stock_masks`), or None."""
    return getattr(_STOCK_MASKS, "implementation", None)


def layer_specs(text_config: Any, modules: list[torch.nn.Module]) -> list[LayerSpec]:
    """What layer i stores per token: heads and head dim from the config, device and dtype from its weights."""
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    if getattr(text_config, "new_decoder_architecture", False):  # Falcon-40B style: grouped K/V, multi_query ignored
        num_kv_heads = text_config.num_kv_heads
    elif getattr(text_config, "multi_query", False):  # GPT-BigCode, Falcon-7B: one K/V head whatever else it says
        num_kv_heads = 1
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    specs = []
    for module in modules:
        weight = next(module.parameters())
        specs.append(LayerSpec(num_kv_heads, head_dim, weight.device, weight.dtype))
    return specs


class BackRef:
    """A weak reference from inside a wrapped model back to the model or its runtime, which deepcopy
    and pickle carry as the object itself (so the links of a copy point into the copy).

    wrap() links hooks, generate() and attention modules back to the model and its runtime. Strong
    links would put the model, its weights and the page pool in reference cycles, which only the
    garbage collector frees: `del model` would keep the pool's memory until a collection runs.
    """

    __slots__ = ("_ref",)

    def __init__(self, obj: object):
        self._ref = weakref.ref(obj)

    def get(self) -> Any:
        """The object, or None once it is gone."""
        return self._ref()

    def __call__(self) -> Any:
        obj = self._ref()
        if obj is None:
            raise ReferenceError(
                "the wrapped model this belongs to was freed: keep a reference to the model while you use its "
                "generate() (hf_paged links generate() to the model weakly, so that `del model` frees the model "
                "and its page pool at once; a stock model's bound generate keeps the model alive)"
            )
        return obj

    def __reduce__(self):
        return BackRef, (self(),)


class BackRefAttribute:
    """A class attribute that keeps what is assigned to it as a BackRef and gives the object back:
    `model = BackRefAttribute()` in a class body, then `self.model = model` and `self.model` as usual."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.slot]()

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = BackRef(value)


@dataclass(eq=False)
class Runtime:
    """The pool, executor and hooks of one wrapped model.

    `lock` guards replacing the pool and opening caches on it (so a pool is never replaced under
    an open cache); the pool's own page bookkeeping has its own lock (`BlockManager.lock`).
    """

    config: PagedConfig
    pool: KVPool
    executor: Executor
    original_attn_implementation: str
    layer_types: list[str] | None
    sliding_window: int | None
    forward_signature: inspect.Signature
    decoder: torch.nn.Module  # the hooked module; compile.py compiles its forward
    attention_modules: list[torch.nn.Module]  # by layer index
    handles: list = field(default_factory=list)
    # hf_paged.integration.compile.CompiledDecode, made on the first compiled generate() (not imported: compile
    # sits above the runtime).
    compiled: Any = None
    # (BackRef to the model object, the `generate` the user had set on that instance or None) for each
    # object wrap() put the runtime and its generate() on: the model given, and the model a PEFT model
    # wraps (wrap.model_objects); unwrap() restores each.
    owners: list[tuple[BackRef, Any]] = field(default_factory=list)
    last_peak_pages: int = 0  # of the generate() call that finished last (each call counts its own)
    last_peak_shared_pages: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    groups: list = field(default_factory=list)  # hf_paged.memory.groups.GroupSpec per group of layers
    patch: Any = None  # the hf_paged.patches module serving this family's attention, if any
    # Where CACHE_KWARG cannot reach the attention (patched families, hf_paged.patches, and some
    # routed ones such as StableLM pass no keyword arguments down): the decoder's hooks also put
    # the cache of this thread's running forward here (per thread: concurrent calls never see each
    # other's), and a compiled step puts its StaticDecodeCache here while it runs.
    forward_caches: threading.local = field(default_factory=threading.local)
    # Each layer's window as the config gives it to stock's DynamicCache(config) (None: full), also
    # under compile=True, whose one group ignores them (PagedCache._check_compiled_window).
    cache_windows: list = field(default_factory=list)
    last_peak_kv_bytes: int = 0
    # This rank's place in the model's tensor-parallel group (tensor_parallel.py), None without TP:
    # the ranks' pools then agree on their page count, and errors before collectives reach all ranks.
    tp: TPGroup | None = None
    last_peak_group_pages: list[int] = field(default_factory=list)
    # Encoder-decoder models (integration/seq2seq.py): the attention modules outside the pool's layers
    # (the encoder's), which fall back to the original implementation; the module whose
    # `compute_bias` gives T5's decoder self-attention bias (None: no bias); why only the torch
    # executor serves the model (None: any executor).
    other_modules: list = field(default_factory=list)
    position_bias: Any = None
    torch_only: str | None = None
    cross_input_rows: bool = False  # the decoder may get one row per input of the encoder output
    # Every forward runs dense (cache/dense.py): Falcon's ALiBi, which stock adds to its mask rounded
    # to bfloat16 at absolute positions, which no exact paged bias reproduces.
    dense_only: bool = False

    # A deepcopy or pickle of a wrapped model is a wrapped model of its own: its runtime points at
    # the copy's modules, and its pool and executor are made on first use (they never travel), so
    # copying costs no pool memory.
    # A copy also leaves out the TP group (a process group does not travel): it sizes its pool alone.
    NOT_COPIED = ("pool", "executor", "compiled", "lock", "forward_caches", "tp", "_weight_slots")

    def __getstate__(self) -> dict:
        state = {name: value for name, value in self.__dict__.items() if name not in self.NOT_COPIED}
        if "kv_shapes" not in state:  # (num_kv_heads, head_dim) per layer: what the copy's pool needs
            state["kv_shapes"] = [(spec.num_kv_heads, spec.head_dim) for spec in self.pool.specs]
        if self.patch is not None:  # a module object neither pickles nor deep-copies: its name does
            state["patch"] = self.patch.__name__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self.patch, str):
            self.patch = importlib.import_module(self.patch)
        self.compiled = None
        self.tp = None
        self.lock = threading.RLock()
        self.forward_caches = threading.local()

    def __getattr__(self, name: str):
        # Only reached for what a copy left out: its own pool and executor, for its own weights.
        if name not in ("pool", "executor") or "kv_shapes" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        weights = [next(module.parameters()) for module in self.attention_modules]
        specs = [LayerSpec(h, d, w.device, w.dtype) for (h, d), w in zip(self.kv_shapes, weights)]
        self.executor = select_executor(self.config.backend, specs, self.config.exact, self.torch_only)
        self.pool = make_pool(self.config, specs, self.groups, self.tp)
        self.groups[:] = self.pool.groups
        return getattr(self, name)

    def model(self) -> torch.nn.Module | None:
        """The wrapped model: the object given to wrap() or, once that is gone, the model a PEFT model
        wrapped (what `merge_and_unload()` returns); None once all are gone or unwrapped."""
        return next((model for model in (ref.get() for ref, _ in self.owners) if model is not None), None)

    def forward_cache(self) -> Any:
        """The cache of this thread's running forward (None outside one)."""
        return getattr(self.forward_caches, "cache", None)

    def set_forward_cache(self, cache: Any) -> None:
        self.forward_caches.cache = cache

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx` from the config, or None for full attention."""
        if self.layer_types is not None and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None

    def current_specs(self) -> list[LayerSpec]:
        """The pool specs the model's layers need now (after any `.to()`, `.half()`, device map change)."""
        return [
            replace(spec, device=weight.device, dtype=weight.dtype)
            for spec, weight in zip(self.pool.specs, (next(m.parameters()) for m in self.attention_modules))
        ]

    def pool_mismatch(self, pool: KVPool) -> str | None:
        """What differs between `pool` and the model's layers now ("layer 0: float32 on cpu -> ..."), or None."""
        for layer_idx, (spec, module) in enumerate(zip(pool.specs, self.attention_modules)):
            weight = next(module.parameters())
            if weight.dtype != spec.dtype or weight.device != spec.device:
                return f"layer {layer_idx}: pool {spec.dtype} on {spec.device}, model {weight.dtype} on {weight.device}"
        return None

    def pool_still_matches(self, pool: KVPool, first_layer_only: bool = False) -> bool:
        """True when every layer's first weight (or only the first layer's) still has `pool`'s dtype
        and device (a cheap check for every forward: `pool_mismatch` walks each module's parameters,
        this reads one dict entry per layer). A layer whose first weight cannot be found where it was
        answers False (then ask `pool_mismatch`)."""
        slots = self.__dict__.get("_weight_slots")
        if slots is None:
            slots = self._weight_slots = [_first_weight_slot(module) for module in self.attention_modules]
        for spec, (owner, name) in zip(pool.specs[:1] if first_layer_only else pool.specs, slots):
            weight = owner._parameters.get(name)
            if weight is None or weight.dtype != spec.dtype or weight.device != spec.device:
                return False
        return True

    def open_pool(self, cache: object) -> tuple[KVPool, Executor]:
        """The pool (and executor) a new cache uses; registers `cache` as open on it.

        The pool follows the model: when the model's dtype or devices changed since the pool was
        made, a new pool (and executor) is made to match, if no cache is open on the old one.
        Otherwise raises ValueError saying what to release. Atomic with respect to other threads.
        """
        with self.lock:
            change = self.pool_mismatch(self.pool)
            if change is not None:
                open_caches = self.pool.num_open_caches()
                if open_caches:
                    raise ValueError(
                        f"the model's dtype or device changed since its page pool was made ({change}) while "
                        f"{open_caches} PagedCache(s) are still open on that pool: let running generate() calls "
                        "finish and release() your own caches, then call again (a new pool is made to match)"
                    )
                specs = self.current_specs()
                executor = select_executor(self.config.backend, specs, self.config.exact, self.torch_only)  # raises first
                self.pool = make_pool(self.config, specs, self.groups, self.tp)
                self.groups[:] = self.pool.groups  # caches read the runtime's list
                self.executor = executor
                self.compiled = None  # its graphs and static addresses are those of the old pool
            self.pool.open_cache(cache)
            return self.pool, self.executor


def _first_weight_slot(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(owning module, attribute name) of `next(module.parameters())`, the weight whose dtype and
    device a layer's pool follows."""
    name = next(name for name, _ in module.named_parameters())
    owner_name, _, attribute = name.rpartition(".")
    return module.get_submodule(owner_name), attribute


def find_runtime(model: torch.nn.Module) -> Runtime | None:
    """The Runtime of a wrapped model, or None."""
    runtime = getattr(model, RUNTIME_ATTR, None)
    if isinstance(runtime, BackRef):  # an attention module's link (wrap.py)
        runtime = runtime.get()
    return runtime if isinstance(runtime, Runtime) else None


def runtime_of(model: torch.nn.Module, needed_by: str = "this") -> Runtime:
    """The Runtime of a wrapped model; ValueError saying to wrap it otherwise."""
    runtime = find_runtime(model)
    if runtime is None:
        raise ValueError(f"{needed_by} needs a model wrapped by hf_paged.wrap(model)")
    return runtime
