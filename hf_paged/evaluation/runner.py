"""Batched generation for an evaluation: prompts batched by length, timed, KV memory measured."""

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    set_seed,
)

from .. import _compat
from ..integration.stats import cache_kv_bytes, clear_prefix_cache
from . import EvalError
from .data import Sample


@dataclass(slots=True)
class Batch:
    """Prompts generated together. `number` is the batch's index in the whole run: it seeds sampling,
    so a batch gives the same tokens whichever process runs it."""

    number: int
    samples: list[Sample]
    prompt_ids: list[list[int]]


@dataclass(slots=True)
class RunStats:
    """What one process measured over its batches (summed or maxed over batches)."""

    generated_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: list[float] = field(default_factory=list)
    peak_kv_bytes: int = 0
    peak_shared_pages: int = 0
    peak_pages_in_use: int = 0
    # One entry per batch: {"batch", "num_samples", "seconds", "time_to_first_token_s"}; a batch's
    # time is recorded once here, not on each of its samples.
    batches: list[dict] = field(default_factory=list)


class FirstTokenTimer(LogitsProcessor):
    """Records when generate() first asks for next-token scores: the prompt has been processed
    (prefill done) and the first token is about to be chosen. Synchronizes CUDA once, at that call."""

    def __init__(self) -> None:
        self.first_call: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first_call is None:
            if scores.device.type == "cuda":
                torch.cuda.synchronize(scores.device)
            self.first_call = time.perf_counter()
        return scores


class StopAtLength(StoppingCriteria):
    """Stops every row at `length` tokens. Not transformers' MaxLengthCriteria, which generate() would
    report as clashing with the one it makes from max_new_tokens."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool, device=input_ids.device)


def encode_prompts(tokenizer, samples: list[Sample], context: int | None, max_new_tokens: int, truncate: bool,
                   encoder_decoder: bool = False) -> list[list[int]]:
    """Token ids of each prompt. A prompt that does not fit the context with max_new_tokens raises
    EvalError, or with `truncate` keeps its last tokens (and its BOS token, if it starts with one).

    An encoder-decoder model's source has the whole context to itself (the output goes to the
    decoder): a longer one raises, or with `truncate` keeps its first tokens (and its last, EOS).
    """
    encoded = tokenizer([sample.prompt for sample in samples], add_special_tokens=True)["input_ids"]
    if context is None:
        return encoded
    budget = context if encoder_decoder else context - max_new_tokens
    if budget < 1:
        raise EvalError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for i, (sample, ids) in enumerate(zip(samples, encoded)):
        if len(ids) <= budget:
            continue
        if not truncate:
            limit = f"the model's source length of {context}" if encoder_decoder else (
                f"with --max-new-tokens {max_new_tokens} it exceeds the model's context of {context}")
            keep = "first" if encoder_decoder else "last"
            raise EvalError(
                f"sample {sample.id!r}: its prompt has {len(ids)} tokens, and {limit}; pass --truncate to keep its "
                f"{keep} {budget} tokens"
            )
        if encoder_decoder:
            encoded[i] = ids[: budget - 1] + ids[-1:] if eos is not None and ids[-1] == eos else ids[:budget]
        else:
            encoded[i] = [bos] + ids[len(ids) - budget + 1 :] if bos is not None and ids[0] == bos else ids[-budget:]
    return encoded


def make_batches(samples: list[Sample], prompt_ids: list[list[int]], batch_size: int) -> list[Batch]:
    """Batches of prompts of similar length (longest first), to limit padding."""
    order = sorted(range(len(samples)), key=lambda i: (-len(prompt_ids[i]), samples[i].index))
    batches = []
    for number, start in enumerate(range(0, len(order), batch_size)):
        chosen = order[start : start + batch_size]
        batches.append(Batch(number, [samples[i] for i in chosen], [prompt_ids[i] for i in chosen]))
    return batches


def _pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device, right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both `[batch, longest]` int64: pads on the left (a decoder-only
    model's prompts), or on the right (`right`: an encoder-decoder model's sources)."""
    longest = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), longest), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        columns = slice(0, len(ids)) if right else slice(longest - len(ids), longest)
        input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids.to(device), attention_mask.to(device)


def _pad_for(model, prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _pad(prompt_ids, pad_id, device, right=bool(getattr(model.config, "is_encoder_decoder", False)))


def stock_cache_bytes(cache: object) -> int:
    """Bytes of keys and values a stock cache holds now: a DynamicCache's, or an encoder-decoder
    model's EncoderDecoderCache's self-attention plus cross-attention caches."""
    parts = [getattr(cache, name, None) for name in ("self_attention_cache", "cross_attention_cache")]
    if any(part is not None for part in parts):
        return sum(cache_kv_bytes(part) for part in parts if part is not None)
    return cache_kv_bytes(cache)


def _trim(row: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is padding)."""
    for position, token in enumerate(row):
        if token in eos_ids:
            return row[: position + 1]
    return row


def run_batches(model, tokenizer, batches: list[Batch], generate_kwargs: dict, seed: int, device: torch.device, label: str, show_progress: bool) -> tuple[list[dict], RunStats]:
    """Generate every batch; returns one record per sample and the stats of this process.

    Works for a wrapped model (KV peaks from hf_paged.memory_stats) and a stock one (KV bytes of
    the cache generate() returns, self- and cross-attention for an encoder-decoder model). Each batch reseeds with `seed + batch.number` before generate().
    """
    import hf_paged

    paged = hasattr(model, "hf_paged_runtime")
    num_return = generate_kwargs.get("num_return_sequences", 1)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    stats = RunStats()
    records = []
    for batch in tqdm(batches, desc=label, unit="batch", disable=not show_progress):
        input_ids, attention_mask = _pad_for(model, batch.prompt_ids, tokenizer.pad_token_id, device)
        timer = FirstTokenTimer()
        set_seed(seed + batch.number)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=LogitsProcessorList([timer]),
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        stats.seconds += seconds
        first_token = timer.first_call - start if timer.first_call is not None else seconds
        stats.first_token_seconds.append(first_token)
        stats.batches.append(
            {"batch": batch.number, "num_samples": len(batch.samples), "seconds": seconds, "time_to_first_token_s": first_token}
        )
        if paged:
            memory = hf_paged.memory_stats(model)
            kv_bytes, shared, pages = memory["peak_kv_bytes"], memory["peak_shared_pages"], memory["peak_pages_in_use"]
            # generate() returns its cache open (return_dict_in_generate): give its pages back before the next batch.
            _release(_compat.output_cache(output))
        else:
            kv_bytes, shared, pages = stock_cache_bytes(_compat.output_cache(output)), 0, 0
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, kv_bytes)
        stats.peak_shared_pages = max(stats.peak_shared_pages, shared)
        stats.peak_pages_in_use = max(stats.peak_pages_in_use, pages)
        # A decoder-only model returns prompt + output; an encoder-decoder one its decoder start token + output.
        generated = output.sequences[:, 1 if getattr(model.config, "is_encoder_decoder", False) else input_ids.shape[1] :].tolist()
        for i, sample in enumerate(batch.samples):
            rows = [_trim(row, eos_ids) for row in generated[i * num_return : (i + 1) * num_return]]
            stats.generated_tokens += sum(len(row) for row in rows)
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
            records.append(
                {
                    "index": sample.index,
                    "id": sample.id,
                    "prompt_tokens": len(batch.prompt_ids[i]),
                    "output_text": texts[0],
                    "output_texts": texts,
                    "output_ids": rows,
                    "generated_tokens": sum(len(row) for row in rows),
                    "reference": sample.reference,
                    "batch": batch.number,
                }
            )
    return records, stats


def warm_up(model, tokenizer, batches: list[Batch], generate_kwargs: dict, device: torch.device) -> None:
    """Untimed generate() calls so one-time costs (allocator, lazy init, compilation) stay out of the timings.

    One short call on the first batch; with compiled decode steps (`PagedConfig(compile=True)`), one
    per decode shape the timed run will meet (rows x capacity, see hf_paged.integration.compile), each with the
    run's own `max_new_tokens` (the capacity depends on it) and stopped after a few tokens.
    With the prefix cache on, it is emptied afterwards: the warm-up's pages are no hits of the run.
    """
    runtime = getattr(model, "hf_paged_runtime", None)
    try:
        _warm_up(model, runtime, tokenizer, batches, generate_kwargs, device)
    finally:
        if runtime is not None and runtime.config.prefix_cache:
            # The warm-up's prompt pages would be hits of the timed run: it leaves no trace there.
            clear_prefix_cache(model)


def _warm_up(model, runtime, tokenizer, batches: list[Batch], generate_kwargs: dict, device: torch.device) -> None:
    if runtime is None or not runtime.config.compile:
        input_ids, attention_mask = _pad_for(model, batches[0].prompt_ids, tokenizer.pad_token_id, device)
        model.generate(input_ids=input_ids, attention_mask=attention_mask, **{**generate_kwargs, "max_new_tokens": 2})
        return
    from ..integration.compile import capacity_pages

    max_new = generate_kwargs["max_new_tokens"]
    seen = set()
    for batch in batches:
        longest = max(len(ids) for ids in batch.prompt_ids)
        shape = (len(batch.prompt_ids), capacity_pages(longest + max_new, runtime.pool.page_size))
        if shape in seen:
            continue
        seen.add(shape)
        input_ids, attention_mask = _pad_for(model, batch.prompt_ids, tokenizer.pad_token_id, device)
        stop = StoppingCriteriaList([StopAtLength(input_ids.shape[1] + 3)])  # two decode steps
        model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=stop, **generate_kwargs)


def _release(cache) -> None:
    """Release a PagedCache a wrapped generate() returned (anything else: nothing to do)."""
    from ..cache.paged_cache import PagedCache

    if isinstance(cache, PagedCache) and not cache.is_released:
        cache.release()
