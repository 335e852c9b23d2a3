"""How far a half-precision model's logits are from fp32's, along one token path for both.

An fp32 copy of the model (the same weights, widened exactly) generates greedily; its tokens are the
path. The half-precision model, wrapped or not, then generates with every token forced to that path,
so each of its decode steps (prefill first) sees the same inputs as fp32's, and its raw logits at
each step are compared with fp32's. Tokens that differ cannot make the paths part: an error here is
arithmetic only.
"""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .. import _compat
from ..cache.paged_cache import PagedCache
from .runner import Batch, _pad, _trim


class ForcePath(LogitsProcessor):
    """Makes generate() choose `paths[row][step]` at each step (the pad token once a row's path ends)."""

    def __init__(self, paths: list[list[int]], prompt_length: int, pad_id: int) -> None:
        self.paths, self.prompt_length, self.pad_id = paths, prompt_length, pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        chosen = [path[step] if step < len(path) else self.pad_id for path in self.paths]
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(chosen)), torch.tensor(chosen, device=scores.device)] = 0.0
        return forced


def _step_logits(model, batch: Batch, pad_id: int, device: torch.device, paths: list[list[int]] | None, max_new: int):
    """generate() on one batch, greedy (forced along `paths` when given): (paths, logits [rows, steps, vocab] fp32)."""
    input_ids, attention_mask = _pad(batch.prompt_ids, pad_id, device)
    processors = LogitsProcessorList([ForcePath(paths, input_ids.shape[1], pad_id)] if paths is not None else [])
    steps = max_new if paths is None else max(len(path) for path in paths)
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors, max_new_tokens=steps,
        do_sample=False, num_beams=1, pad_token_id=pad_id, return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(output.logits, dim=1).float()  # [rows, steps, vocab]
    cache = _compat.output_cache(output)
    if isinstance(cache, PagedCache) and not cache.is_released:  # returned open by a wrapped generate()
        cache.release()
    if paths is None:
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        paths = [_trim(row, eos_ids) for row in output.sequences[:, input_ids.shape[1] :].tolist()]
    return paths, logits


@torch.no_grad()
def fp32_paths(reference: torch.nn.Module, batches: list[Batch], pad_id: int, device: torch.device, max_new: int) -> list[list[list[int]]]:
    """The fp32 model's greedy tokens of every batch (per batch, per row, up to and including EOS)."""
    return [_step_logits(reference, batch, pad_id, device, None, max_new)[0] for batch in batches]


@torch.no_grad()
def mean_abs_error(model, reference: torch.nn.Module, batches: list[Batch], paths: list[list[list[int]]], pad_id: int, device: torch.device, max_new: int) -> dict:
    """{"mean_abs": mean |logit - fp32 logit| over the path's steps and the vocabulary, "num_tokens",
    "top1": the fraction of the path's steps where `model`'s highest logit is the fp32 model's}.

    `model` (half precision, wrapped or not) is forced along `paths`; `reference` (fp32) generates
    them again here, batch by batch, so no more than one batch of fp32 logits is held at a time.
    """
    total, count, tokens, top1 = 0.0, 0, 0, 0
    for batch, batch_paths in zip(batches, paths):
        _, expected = _step_logits(reference, batch, pad_id, device, None, max_new)
        _, actual = _step_logits(model, batch, pad_id, device, batch_paths, max_new)
        for row, path in enumerate(batch_paths):
            difference = (actual[row, : len(path)] - expected[row, : len(path)]).abs()
            total += float(difference.sum(dtype=torch.float64))
            count += difference.numel()
            tokens += len(path)
            top1 += int((actual[row, : len(path)].argmax(-1) == expected[row, : len(path)].argmax(-1)).sum())
    return {"mean_abs": total / count if count else 0.0, "num_tokens": tokens, "top1": top1 / tokens if tokens else 1.0}


def fp32_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """An fp32 copy of a float16/bfloat16 model (the same weights, widened exactly), else None."""
    if next(model.parameters()).dtype not in (torch.float16, torch.bfloat16):
        return None
    import copy

    return copy.deepcopy(model).float().eval()


def combine(per_process: list[dict]) -> dict:
    """One report from each process's {"paged": mean_abs_error(...), "stock": ...}: the means over all
    processes' logits, their ratio (paged / stock), the tokens of the path, and each side's top-1
    (the fraction of the path's steps whose best token is the fp32 model's)."""

    def mean(part: str, key: str = "mean_abs") -> float:
        tokens = sum(errors[part]["num_tokens"] for errors in per_process)
        return sum(errors[part][key] * errors[part]["num_tokens"] for errors in per_process) / tokens if tokens else 0.0

    paged, stock = mean("paged"), mean("stock")
    return {"paged": paged, "stock": stock, "ratio": paged / stock if stock else None,
            "num_tokens": sum(errors["paged"]["num_tokens"] for errors in per_process),
            "top1_paged": mean("paged", "top1"), "top1_stock": mean("stock", "top1")}
