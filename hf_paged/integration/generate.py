"""The generate() wrapper: prefill the prompt once per input, fork the rows, release every page."""

import functools
import warnings

import torch

from .. import _compat
from ..cache.dense import holes_in
from ..cache.paged_cache import PagedCache
from ..cache.runtime import BackRefAttribute, stock_masks
from ..memory.prefix_cache import PrefixCache
from ..model_state import model_state_key
from . import seq2seq
from .compile import generate_max_tokens, maybe_compiled_decode
from .interface import follow_implementation_change, original_implementation
from .prefill import can_use_prefix_cache, forward_parameters, prefill_with_prefix_cache


def _runs_on_a_cache(settings) -> bool:
    """Whether generate() would run on a KV cache hf_paged may replace by a PagedCache.

    `use_cache=False` recomputes every token without a cache; a `cache_implementation` asks for
    transformers' own cache (and generate() refuses it next to a passed cache). Both run stock.
    """
    if not settings.use_cache:
        return False
    if settings.cache_implementation is not None:
        warnings.warn(
            f"generation config asks for cache_implementation={settings.cache_implementation!r}: this generate() "
            "runs on that cache, not on hf_paged's pages (set it to None to use them)",
            stacklevel=3,
        )
        return False
    return True


def _expand_size(model, generation_config, kwargs: dict) -> int:
    """Rows per input generate() will run: max(num_beams, num_return_sequences)."""
    config = generation_config if generation_config is not None else model.generation_config
    num_beams = kwargs.get("num_beams") or config.num_beams or 1
    num_return = kwargs.get("num_return_sequences") or config.num_return_sequences or 1
    return max(num_beams, num_return)


def _num_beams(model, generation_config, kwargs: dict) -> int:
    config = generation_config if generation_config is not None else model.generation_config
    return kwargs.get("num_beams") or config.num_beams or 1


def _can_prefill_once(model, input_ids, generation_config, kwargs: dict) -> bool:
    """Whether the prompt can be prefilled outside generate() exactly as generate() would."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        return False
    if input_ids.dtype not in (torch.int64, torch.int32):
        return False
    config = generation_config if generation_config is not None else model.generation_config
    if kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None):
        return False
    # Stock's first step returns the hidden states of the whole prompt ([rows, prompt length, hidden]):
    # a prompt prefilled here would leave generate() only its last token's.
    # The same for attention weights (`output_attentions`: every forward then runs dense, cache/dense.py).
    for name in ("output_hidden_states", "output_attentions"):
        if kwargs.get(name) or getattr(config, name, False):
            return False
    # Any other tensor input (embeddings, position ids, multimodal inputs) goes through generate() as is.
    extra = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")]
    if extra:
        return False
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(holes_in(mask).any()):
        # Right padding, holes: a prompt query that sees no real key (a pad past a sliding window)
        # attends uniformly over every key in stock, pads included, which only the prompt's own
        # forward still holds (pads take no page): the prompt runs whole, in generate()'s forward.
        return False
    if mask is None:
        # generate() would infer a padding mask from pad tokens in the prompt: leave that case to it.
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        if pad is not None and bool((input_ids == pad).any()):
            return False
    return True


@torch.no_grad()
def prefill_prompt(model, cache: PagedCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Run the prompt minus its last token once per input, storing its K/V in `cache`.

    generate() then feeds only the last token (it sees `cache.get_seq_length() == len - 1`).
    """
    inputs = {"input_ids": input_ids[:, :-1], _compat.model_cache_arg(model): cache, "use_cache": True}
    parameters = forward_parameters(model)  # a PEFT model's own forward names neither position_ids nor logits_to_keep
    if attention_mask is not None:
        mask = attention_mask[:, :-1]
        inputs["attention_mask"] = mask
        if "position_ids" in parameters:
            # As generate() computes them: pads at 0, real tokens counted from 0.
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if "logits_to_keep" in parameters:
        inputs["logits_to_keep"] = 1
    cache.prompt_phase = "prefill"
    model(**inputs)
    cache.prompt_phase = "last"  # generate() feeds the last token next (PagedCache.prompt_phase)


ASSISTED_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit")


def _can_use_prefix_cache(model, input_ids, settings, kwargs: dict) -> bool:
    """Whether this call can prefill through the pool's prefix cache (`settings`: the merged GenerationConfig)."""
    if not model.hf_paged_runtime.config.prefix_cache or not _can_prefill_once(model, input_ids, settings, kwargs):
        return False
    # Assisted and prompt-lookup decoding do not give stock's tokens on a prefilled cache (measured
    # with a stock DynamicCache too): those calls run as without the prefix cache.
    if kwargs.get("assistant_model") is not None or any(getattr(settings, name, None) for name in ASSISTED_SETTINGS):
        return False
    return can_use_prefix_cache(model, kwargs.get("attention_mask"))


def _prefix_cache_of(cache: PagedCache, model) -> PrefixCache:
    """The prefix cache of the pool `cache` opened (a new pool after model.to(...)), emptied first if
    the model changed since its pages were computed (weights, hooks, adapters: model_state.py)."""
    prefix_cache = cache.pool.prefix_cache
    key = model_state_key(model)  # outside the lock: it may wait for the device
    with cache.pool.blocks.lock:  # other calls' caches may hold or evict its pages meanwhile
        prefix_cache.check_weights(key)
    return prefix_cache


class PagedGenerate:
    """`model.generate` of a wrapped model: runs on a PagedCache by default.

    An object holding the model rather than a closure over it, so that a deepcopy or pickle of the
    model carries a generate() bound to the copy (issue 15: a copy generated with the original).
    """

    model = BackRefAttribute()  # weak: the model holds this object

    def __init__(self, model):
        self.__setstate__({"model": model})

    def __getstate__(self) -> dict:
        return {"model": self.model}  # the rest is generate()'s name, docs and signature, set again on load

    def __setstate__(self, state: dict) -> None:
        self.model = state["model"]
        functools.update_wrapper(self, type(self.model).generate)

    def __call__(self, inputs=None, generation_config=None, **kwargs):
        """Calls may run concurrently (several threads, one model): each owns its PagedCache on the
        shared pool and nothing else of the call is shared. A call that finds the pool short raises
        OutOfPagesError (it does not wait for pages other calls hold: two calls waiting for each other
        would never finish); size the pool for the calls you run at once.
        """
        model = self.model
        original = type(model).generate
        runtime = model.hf_paged_runtime
        follow_implementation_change(runtime)  # config._attn_implementation changed after wrap()
        # Every setting read below is read as generate() reads it: passed config, else the model's, then kwargs.
        settings = _compat.resolve_generation_config(model, generation_config, kwargs)
        if _compat.user_cache(kwargs) is not None:
            return original(model, inputs, generation_config, **kwargs)
        if kwargs.get("cache_implementation") == "paged":  # read where stock reads it: kwargs only
            # transformers' continuous batching: its own paged cache, and attention it picks from the
            # model's implementation, which must name the original one while it runs.
            with original_implementation(runtime):
                return original(model, inputs, generation_config, **kwargs)
        # As another model's assistant_model, transformers calls this generate() once per round and
        # passes the cache it returned back in (cropped): a cache this call created would be released
        # by then. The assistant's rounds run the stock way, on its own cache (is_assistant: set by
        # transformers' candidate generators on the config they pass).
        if not _runs_on_a_cache(settings) or getattr(settings, "is_assistant", False):
            # Stock's masks in this thread only (other threads' paged calls keep theirs); attention
            # without a PagedCache runs the original implementation.
            with stock_masks(runtime.original_attn_implementation):
                return original(model, inputs, generation_config, **kwargs)
        if getattr(model.config, "is_encoder_decoder", False):
            # The cache is made where stock makes it (seq2seq.PreparePagedCache), once per stock run.
            seq2seq.check_source(inputs, kwargs)
            with seq2seq.session(model, runtime):  # (Whisper's generate names its first argument input_features)
                args = (inputs,) if inputs is not None else ()
                if generation_config is not None:
                    kwargs["generation_config"] = generation_config
                return original(model, *args, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        expand = _expand_size(model, settings, kwargs)
        use_prefix_cache = _can_use_prefix_cache(model, input_ids, settings, kwargs)
        # PagedConfig(exact=True): the prompt runs in generate()'s own forward of every row, as stock
        # runs it (prefilled once per input, its last token's forward has another batch shape).
        fork = expand > 1 and not runtime.config.exact and _can_prefill_once(model, input_ids, settings, kwargs)
        # Consecutive pages: for every row's whole life when rows share nothing; for the prompts
        # when they are forked (their shared prefixes are then read in place).
        if fork:
            reserve = input_ids.shape[1]
        else:
            reserve = generate_max_tokens(model, inputs, settings, kwargs) if expand == 1 else None
        cache = PagedCache(model, max_tokens_per_row=reserve)  # a new pool if the model's dtype/device changed
        returned = False
        try:
            if use_prefix_cache:
                prefix_cache = _prefix_cache_of(cache, model)
                prefill_with_prefix_cache(model, cache, prefix_cache, input_ids, kwargs.get("attention_mask"))
                if expand > 1:
                    cache.batch_repeat_interleave(expand)
            elif fork:
                prefill_prompt(model, cache, input_ids, kwargs.get("attention_mask"))
                cache.batch_repeat_interleave(expand)
            with maybe_compiled_decode(model, inputs, settings, kwargs):  # PagedConfig(compile=True)
                kwargs[_compat.model_cache_arg(model)] = cache
                result = original(model, inputs, generation_config, **kwargs)
            # A dict output carries the cache (return_dict_in_generate=True): it stays usable, as
            # stock's does, and holds its pages until dropped or release()d.
            returned = _compat.output_cache(result) is cache
            if returned:
                cache.returned_by_generate(_num_beams(model, settings, kwargs))
            return result
        finally:
            if not returned:
                cache.release()
            # This call's own peaks (its page tables count them), whatever other calls hold: the page
            # ids all groups held at one instant (inside forwards), group_pages.py.
            runtime.last_peak_pages = cache.pages.peak_pool_pages
            runtime.last_peak_shared_pages = sum(tables.peak_shared_held for tables in cache.group_tables)
            runtime.last_peak_kv_bytes = cache.peak_kv_bytes
            runtime.last_peak_group_pages = list(cache.peak_group_pages)


def make_generate(model) -> PagedGenerate:
    """A bound generate() for `model` that runs on a PagedCache by default."""
    return PagedGenerate(model)
