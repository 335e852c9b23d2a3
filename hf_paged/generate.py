"""The generate() wrapper: prefill the prompt once per input, fork the rows, release every page."""

import functools
import inspect

import torch

from . import _compat
from .cache import PagedCache
from .compile import generate_max_tokens, maybe_compiled_decode


def _expand_size(model, generation_config, kwargs: dict) -> int:
    """Rows per input generate() will run: max(num_beams, num_return_sequences)."""
    config = generation_config if generation_config is not None else model.generation_config
    num_beams = kwargs.get("num_beams") or config.num_beams or 1
    num_return = kwargs.get("num_return_sequences") or config.num_return_sequences or 1
    return max(num_beams, num_return)


def _can_prefill_once(model, input_ids, generation_config, kwargs: dict) -> bool:
    """Whether the prompt can be prefilled outside generate() exactly as generate() would."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        return False
    if input_ids.dtype not in (torch.int64, torch.int32):
        return False
    config = generation_config if generation_config is not None else model.generation_config
    if kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None):
        return False
    # Any other tensor input (embeddings, position ids, multimodal inputs) goes through generate() as is.
    extra = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")]
    if extra:
        return False
    if kwargs.get("attention_mask") is None:
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
    parameters = inspect.signature(model.forward).parameters
    if attention_mask is not None:
        mask = attention_mask[:, :-1]
        inputs["attention_mask"] = mask
        if "position_ids" in parameters:
            # As generate() computes them: pads at 0, real tokens counted from 0.
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if "logits_to_keep" in parameters:
        inputs["logits_to_keep"] = 1
    model(**inputs)


def make_generate(model):
    """A bound generate() for `model` that runs on a PagedCache by default."""
    original = type(model).generate

    @functools.wraps(original)
    def generate(inputs=None, generation_config=None, **kwargs):
        runtime = model.hf_paged_runtime
        # generate() reads use_cache from the model's generation config when the call gives none
        # (MPT's defaults to False: it then re-feeds the whole sequence each step, with no cache).
        config = generation_config if generation_config is not None else model.generation_config
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        if _compat.user_cache(kwargs) is not None or use_cache is False:
            return original(model, inputs, generation_config, **kwargs)
        blocks = runtime.pool.blocks
        blocks.reset_peaks()
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        expand = _expand_size(model, generation_config, kwargs)
        fork = expand > 1 and _can_prefill_once(model, input_ids, generation_config, kwargs)
        # Consecutive pages: for every row's whole life when rows share nothing; for the prompts
        # when they are forked (their shared prefixes are then read in place).
        if fork:
            reserve = input_ids.shape[1]
        else:
            reserve = generate_max_tokens(model, inputs, generation_config, kwargs) if expand == 1 else None
        cache = PagedCache(model, max_tokens_per_row=reserve)
        try:
            if fork:
                prefill_prompt(model, cache, input_ids, kwargs.get("attention_mask"))
                cache.batch_repeat_interleave(expand)
            with maybe_compiled_decode(model, inputs, generation_config, kwargs):  # PagedConfig(compile=True)
                kwargs[_compat.model_cache_arg(model)] = cache
                return original(model, inputs, generation_config, **kwargs)
        finally:
            cache.release()
            runtime.last_peak_pages = blocks.peak_used_pages
            runtime.last_peak_shared_pages = blocks.peak_shared_pages

    return generate
