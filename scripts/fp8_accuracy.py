"""fp8 pages on the trained default model: token agreement and logit error (the table of docs/fp8.md).

    PYTHONPATH=. python scripts/fp8_accuracy.py                      # bf16 weights, CPU, 40 prompts, 32 new tokens
    PYTHONPATH=. python scripts/fp8_accuracy.py --limit 8 --max-new-tokens 16 --json fp8.json

The model in bf16 runs the built-in task's prompts (hf_paged/data/stdlib_functions.jsonl, batches of
8 by length, as scripts/eval.py) with each KV store:

- stock: transformers' DynamicCache, sdpa (the reference of "agreement with stock");
- hf_paged pages "auto" (bf16, the reference of "agreement with bf16 pages"), "fp8_e4m3", "fp8_e5m2";
- transformers' QuantizedCache, each backend that imports here: "fp8" (per-tensor e4m3, scale from
  the first update's amax, no headroom), "quanto" and "hqq" (int4, groups of 64, the last
  `residual_length` = 128 tokens kept unquantized: with 32 new tokens, the prompt is quantized and the
  generated tokens are not).

- stock's DynamicCache with K/V rounded to fewer mantissa bits (`--mantissa-bits`, default 6, 5, 4, 3;
  bf16 keeps 7, e4m3 3, e5m2 2), every exponent kept: how far the model's tokens move with the
  precision of the stored K/V alone, with no scale or range involved. The bound this puts on any
  KV format of that precision is in docs/fp8.md.

Agreement: the fraction of prompts whose every generated token equals the reference's, greedy and
with 4 beams (QuantizedCache: greedy only). Logit error: mean |logit - fp32 logit| over the
vocabulary along the fp32 model's greedy path, each store forced along it
(hf_paged.evaluation.logit_error, as eval.py --compare); top-1: along that forced path, the fraction
of steps where the store's highest logit is the fp32 model's token (a per-token agreement that one
flipped near-tie does not end, as it ends a prompt's). A backend that does not import is listed
as skipped with the reason.
"""

import argparse
import functools
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import hf_paged
from hf_paged import _compat
from hf_paged.evaluation import default_model_path
from hf_paged.evaluation.data import BUILTIN_TASK, bundled_data_files, load_rows, make_samples
from hf_paged.evaluation.logit_error import fp32_copy, fp32_paths, mean_abs_error
from hf_paged.evaluation.runner import _pad, encode_prompts, make_batches

PAGED = ("auto", "fp8_e4m3", "fp8_e5m2")
QUANTIZED = {"fp8": {}, "quanto": {"nbits": 4}, "hqq": {"nbits": 4}}


class WithCache:
    """`model` whose generate() gets a fresh cache from `make_cache()` per call."""

    def __init__(self, model, make_cache):
        self.model, self.make_cache = model, make_cache
        self.generation_config = model.generation_config

    def generate(self, **kwargs):
        return self.model.generate(**{_compat.model_cache_arg(self.model): self.make_cache()}, **kwargs)


def quantized_cache(model, backend: str):
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(backend, model.config, **QUANTIZED[backend])


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`x` rounded to `bits` mantissa bits (to nearest, ties to even; the exponent unbounded), in its dtype."""
    fraction, exponent = torch.frexp(x.float())  # x = fraction * 2**exponent, |fraction| in [0.5, 1)
    steps = 2.0 ** (bits + 1)  # the leading bit and `bits` more
    return torch.ldexp(torch.round(fraction * steps) / steps, exponent).to(x.dtype)


class RoundedCache(DynamicCache):
    """Stock's DynamicCache whose every K/V update is rounded to `bits` mantissa bits before it is
    stored and attended: a KV store of that precision."""

    def __init__(self, config, bits: int):
        super().__init__(config=config)
        self.bits = bits

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states, value_states = round_mantissa(key_states, self.bits), round_mantissa(value_states, self.bits)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def generated(model, batches, pad_id: int, max_new: int, num_beams: int) -> list[list[int]]:
    """Every prompt's generated ids (batch order), greedy or beam search, fixed length."""
    rows = []
    for batch in batches:
        input_ids, mask = _pad(batch.prompt_ids, pad_id, torch.device("cpu"))
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, num_beams=num_beams, pad_token_id=pad_id)
        rows += out[:, input_ids.shape[1]:].tolist()
    return rows


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def quantized_reason(backend: str) -> str | None:
    """Why transformers' QuantizedCache(backend) cannot run here, or None."""
    module = {"quanto": "optimum.quanto", "hqq": "hqq"}.get(backend)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # not installed, or broken
        return f"{module} does not import ({type(error).__name__}: {error})"
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=40, help="first N prompts of the built-in task")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mantissa-bits", default="6,5,4,3", metavar="B,B",
                        help="stock with K/V rounded to each of these mantissa bits ('' for none)")
    parser.add_argument("--json", metavar="PATH", help="write every number as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.bfloat16).eval()
    task = BUILTIN_TASK
    samples = make_samples(load_rows(None, None, None, bundled_data_files()), task.text_column, task.reference_column,
                           task.prompt_template, args.limit)
    batches = make_batches(samples, encode_prompts(tokenizer, samples, None, args.max_new_tokens, False), args.batch_size)
    pad, new = tokenizer.pad_token_id, args.max_new_tokens
    reference = fp32_copy(model)
    paths = fp32_paths(reference, batches, pad, torch.device("cpu"), new)

    stores = {"stock": model}
    skipped = {}
    for backend in QUANTIZED:
        reason = quantized_reason(backend)
        if reason:
            skipped[f"QuantizedCache {backend}"] = reason
        else:
            stores[f"QuantizedCache {backend}"] = WithCache(model, functools.partial(quantized_cache, model, backend))
    for bits in [int(b) for b in args.mantissa_bits.split(",") if b.strip()]:
        stores[f"stock, K/V {bits} mantissa bits"] = WithCache(model, functools.partial(RoundedCache, model.config, bits))
    results = {}
    for name in ["stock", *(f"pages {d}" for d in PAGED), *(s for s in stores if s != "stock")]:
        if name.startswith("pages"):
            hf_paged.wrap(model, kv_cache_dtype=name.split()[1], max_memory=1 << 28, backend="torch")
            store = model
        else:
            if hasattr(model, "hf_paged_runtime"):
                hf_paged.unwrap(model)
            store = stores[name]
        entry = {"greedy": generated(store, batches, pad, new, 1)}
        if not name.startswith("Quantized"):
            entry["beam4"] = generated(store, batches, pad, new, 4)
        errors = mean_abs_error(store, reference, batches, paths, pad, torch.device("cpu"), new)
        entry["logit_error"], entry["top1"] = errors["mean_abs"], errors["top1"]
        if name.startswith("pages"):
            stats = hf_paged.memory_stats(model)
            entry["page_bytes"], entry["clamped"] = stats["page_bytes"], stats.get("kv_clamped_values", 0)
        results[name] = entry
        print(f"{name}: done ({time.time() - started:.0f} s)", flush=True)
    hf_paged.unwrap(model)

    table = []
    for name, entry in results.items():
        row = {"store": name, "logit_error": entry["logit_error"], "top1_vs_fp32": entry["top1"], "page_bytes": entry.get("page_bytes"),
               "clamped": entry.get("clamped")}
        for mode in ("greedy", "beam4"):
            if mode in entry:
                row[f"{mode}_vs_stock"] = agreement(entry[mode], results["stock"][mode])
                row[f"{mode}_vs_bf16_pages"] = agreement(entry[mode], results["pages auto"][mode])
        table.append(row)
    header = f"{'store':<30}{'greedy=stock':>13}{'greedy=bf16p':>13}{'beam4=stock':>12}{'beam4=bf16p':>12}{'logit err':>11}{'top-1=fp32':>11}"
    print(f"\n{len(samples)} prompts, {new} new tokens, bf16 weights, CPU ({time.time() - started:.0f} s)")
    print(header)
    print("-" * len(header))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for row in table:
        print(f"{row['store']:<30}{fmt(row.get('greedy_vs_stock')):>13}{fmt(row.get('greedy_vs_bf16_pages')):>13}"
              f"{fmt(row.get('beam4_vs_stock')):>12}{fmt(row.get('beam4_vs_bf16_pages')):>12}{row['logit_error']:>11.5f}{row['top1_vs_fp32']:>11.4f}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    document = {"prompts": len(samples), "max_new_tokens": new, "table": table, "skipped": skipped,
                "torch": torch.__version__, "elapsed_s": time.time() - started}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(document, out, indent=1)
    return document


if __name__ == "__main__":
    main()
