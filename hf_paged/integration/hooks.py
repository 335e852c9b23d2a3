"""The decoder's forward hooks wrap() installs: place each forward's tokens in the PagedCache the
forward was given (and, for an encoder-decoder model, its cross-attention pages), and end the forward."""

import functools
import threading

from transformers.cache_utils import EncoderDecoderCache

from .. import _compat
from ..cache.paged_cache import PagedCache
from ..cache.runtime import CACHE_KWARG, BackRefAttribute, Runtime, set_stock_masks
from .interface import ATTN_NAME, _register_functions, follow_implementation_change


class _RuntimeHook:
    """A hook of the model's runtime. A class rather than a closure so that a deepcopy or pickle of
    the model carries a hook bound to the copy's runtime; the link is weak (BackRef), so the hook
    keeps neither the runtime nor its pool alive: the model holds them."""

    runtime = BackRefAttribute()

    def __init__(self, runtime: Runtime):
        self.runtime = runtime


class _BeginForward(_RuntimeHook):
    """Pre-hook of the decoder: places this forward's tokens in the PagedCache it was given."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _register_functions()  # an unpickled model in a fresh process names the "hf_paged" implementation

    def __call__(self, module, args, kwargs):
        runtime = self.runtime
        # generate() passes keywords only: binding them to the signature (tens of µs per step) would
        # change nothing that find_cache or the lookups below read.
        arguments = kwargs if not args else runtime.forward_signature.bind_partial(*args, **kwargs).arguments
        cache = _compat.find_cache(arguments)
        if isinstance(cache, EncoderDecoderCache) and isinstance(cache.self_attention_cache, PagedCache):
            return self._begin_encoder_decoder(module, args, kwargs, arguments, cache.self_attention_cache)
        if not isinstance(cache, PagedCache):
            return None
        if cache.cross is not None:
            raise ValueError(
                "an encoder-decoder model's forward takes a PagedCache inside an EncoderDecoderCache: let the "
                "wrapped generate() make it, or pass hf_paged.cache.cross.PagedEncoderDecoderCache(cache, cache.cross)"
            )
        if cache.runtime is not runtime and cache.pool is not runtime.pool:
            raise ValueError("this PagedCache belongs to another model; create it with PagedCache(model)")
        implementation = _compat.attn_implementation(getattr(module, "config", None)) or ATTN_NAME
        if runtime.patch is None and implementation != ATTN_NAME:
            # Changed after wrap(): that implementation becomes the fallback, and the pages serve this forward.
            follow_implementation_change(runtime)
        inputs = arguments.get("input_ids")
        if inputs is None:
            inputs = arguments.get("inputs_embeds")
        if inputs is None:
            raise ValueError("hf_paged needs input_ids or inputs_embeds")
        batch_size, q_len = inputs.shape[:2]
        # Stock's attention weights come from a dense forward (cache/dense.py).
        begin = functools.partial(
            cache.begin_forward, batch_size, q_len, arguments.get("attention_mask"), inputs.device,
            _wants_weights(module, kwargs, arguments),
        )
        if runtime.tp is None:
            begin()
        else:  # a rank that cannot place its tokens must not leave the others waiting in the forward's collectives
            runtime.tp.run(begin, "placing a forward's tokens")
        runtime.set_forward_cache(cache)  # for attention that the keyword does not reach
        return args, {**kwargs, CACHE_KWARG: cache}

    def _begin_encoder_decoder(self, module, args, kwargs, arguments, cache: PagedCache):
        """An encoder-decoder decoder's forward: its self-attention tokens placed as above; at the
        call's first forward, the cross-attention pages of every input (cache/cross.py), and from then
        on one row per input of the encoder output (its cross-attention projections run once per input)."""
        inputs = arguments.get("input_ids")
        if inputs is None:
            inputs = arguments.get("inputs_embeds")
        states = arguments.get("encoder_hidden_states")
        if inputs is None or states is None:
            raise ValueError("hf_paged needs the decoder's input_ids (or inputs_embeds) and encoder_hidden_states")
        if _wants_weights(module, kwargs, arguments):
            raise ValueError(
                "output_attentions on a wrapped encoder-decoder model: its pages give no attention weights; "
                "run this call on hf_paged.unwrap(model)"
            )
        cache.begin_forward(inputs.shape[0], inputs.shape[1], arguments.get("attention_mask"), inputs.device)
        try:
            if cache.dense_forward:  # (cache/dense.py) its cross-attention layers would read no K/V
                raise ValueError(
                    "a decoder attention_mask with pads paged attention cannot express, on an encoder-decoder "
                    "model: pad decoder_input_ids on the left, or run this call on hf_paged.unwrap(model)"
                )
            if not cache.cross.prepared:
                cache.cross.prepare(states, arguments.get("encoder_attention_mask"), [cache.pages])
        except BaseException:
            cache.end_forward(completed=False)
            raise
        self.runtime.set_forward_cache(cache)
        kwargs = {**kwargs, CACHE_KWARG: cache}
        if "encoder_hidden_states" in kwargs and self.runtime.cross_input_rows:
            kwargs["encoder_hidden_states"] = cache.cross.input_states(states)
        return args, kwargs


class _EndForward(_RuntimeHook):
    """Forward hook of the decoder (always called, also on errors): ends the forward in the cache."""

    def __call__(self, module, args, kwargs, output):
        self.runtime.set_forward_cache(None)
        cache = kwargs.get(CACHE_KWARG)
        if isinstance(cache, PagedCache):  # (a compiled step's dispatcher may have swapped in its own)
            cache.end_forward(completed=output is not None)
        return None


# Per thread: the mask settings an encoder forward replaced (restored when it ends; encoders may nest).
_ENCODER_MASKS = threading.local()


class _BeginEncoder(_RuntimeHook):
    """Pre-hook of an encoder-decoder model's encoder, which runs stock: this thread's mask function
    builds the original implementation's masks while it runs (encoder attention that adds the mask
    itself, as BigBird-Pegasus' does, never sees hf_paged's lazy mask)."""

    def __call__(self, module, args):
        stack = _ENCODER_MASKS.__dict__.setdefault("stack", [])
        stack.append(set_stock_masks(self.runtime.original_attn_implementation))


class _EndEncoder:
    """Forward hook of the encoder (always called, also on errors): the mask setting it replaced."""

    def __call__(self, module, args, output):
        stack = _ENCODER_MASKS.__dict__.get("stack")
        if stack:
            set_stock_masks(stack.pop())


def encoder_hooks(runtime: Runtime, encoder) -> list:
    """The encoder's hook handles (removed with the decoder's by unwrap)."""
    return [
        encoder.register_forward_pre_hook(_BeginEncoder(runtime)),
        encoder.register_forward_hook(_EndEncoder(), always_call=True),
    ]


def _wants_weights(module, kwargs: dict, arguments: dict) -> bool:
    """Whether the forward asks for attention weights (stock's come from a dense forward, cache/dense.py)."""
    weights = kwargs.get("output_attentions", arguments.get("output_attentions"))  # (a `**kwargs` entry when bound)
    if weights is None:
        weights = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(weights)


def _make_begin_hook(runtime: Runtime) -> _BeginForward:
    return _BeginForward(runtime)


def _make_end_hook(runtime: Runtime) -> _EndForward:
    return _EndForward(runtime)
