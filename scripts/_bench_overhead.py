"""The `overhead` workload of scripts/bench.py: host time the paged path adds per layer and token.

On a model whose arithmetic is negligible (Llama, hidden 64: every matmul is a few hundred
flops), a decode step is Python and operator dispatch only, as an eager decode step on a GPU is
until the batch is large. What the paged path adds there is paid on every layer of every token.

Sides, one process, interleaved stock / torch / FlashInfer host, after a warm-up of each:
- stock: sdpa + DynamicCache.
- torch: the model wrapped with the torch executor (tokens must equal stock's).
- flashinfer-host: the same wrapped model with the FlashInfer executor on a host-only stand-in
  for the `flashinfer` module (`HostOnlyFlashInfer`): its wrappers take the real call shapes,
  plan nothing and return the query as the attention output, so what is timed is hf_paged's side
  of a FlashInfer decode step without any kernel (tokens differ from stock's, by construction).

Time: thread CPU time (`time.thread_time`, so waiting for a busy machine's cores is not counted)
between the starts of consecutive decode forwards (one per token; everything generate() does per
token is inside), pooled over every run of a side; the `PERCENTILE`th percentile of those steps is
the side's step time (on a shared machine the lower percentiles are the undisturbed steps).
Added per layer and token = (side - stock) / layers.
"""

import copy
import sys
import time
import types
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_paged
from hf_paged.attention import TorchExecutor

PERCENTILE = 20


@dataclass(frozen=True, slots=True)
class OverheadCase:
    name: str
    batch_size: int
    do_sample: bool = False
    num_return_sequences: int = 1


CASES = (
    OverheadCase("greedy, batch 1", 1),
    OverheadCase("sample, batch 4 x 2 seqs", 4, do_sample=True, num_return_sequences=2),
)


class _HostOnlyWrapper:
    """A FlashInfer wrapper with no kernel: plan() keeps nothing, run() returns the query."""

    def __init__(self, *args, **kwargs):
        pass

    def plan(self, *args, **kwargs):
        pass

    def run(self, q, paged_kv_cache, *args, **kwargs):
        return q


def host_only_flashinfer() -> types.ModuleType:
    """A stand-in `flashinfer` module whose wrappers do no work (see the module docstring)."""
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = type("HostOnlyDecode", (_HostOnlyWrapper,), {})
    module.BatchPrefillWithPagedKVCacheWrapper = type("HostOnlyPrefill", (_HostOnlyWrapper,), {})
    return module


def build_models(layers: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stock and wrapped compute-free Llamas sharing one set of random weights."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    torch.manual_seed(seed)
    stock = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    paged = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    paged.load_state_dict(stock.state_dict(), assign=True)
    for model in (stock, paged):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return stock, paged


def percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * q // 100)]


def measure_overhead(args, quick: bool) -> dict:
    """Step times of every side for each case in CASES; see the module docstring."""
    from hf_paged.attention.flashinfer.executor import FlashInferExecutor

    layers, new_tokens, prompt_len = (2, 8, 8) if quick else (8, 200, 16)
    stock, paged = build_models(layers, args.seed)
    exact = getattr(args, "exact", False)  # --exact: the torch side computes as stock does (docs/numerics.md)
    hf_paged.wrap(paged, page_size=args.page_size, num_pages=512, backend="torch", exact=exact)
    runtime = paged.hf_paged_runtime
    standin = host_only_flashinfer()
    previous = sys.modules.get("flashinfer")
    sys.modules["flashinfer"] = standin
    try:
        executors = {"torch": TorchExecutor(exact=exact), "flashinfer-host": FlashInferExecutor()}
    finally:
        _restore(previous)
    starts: list[float] = []
    for model in (stock, paged):
        model.register_forward_pre_hook(lambda *unused: starts.append(time.thread_time()))

    def run(side: str, case: OverheadCase) -> tuple[torch.Tensor, list[float]]:
        model = stock if side == "stock" else paged
        if side != "stock":
            runtime.executor = executors[side]
            sys.modules["flashinfer"] = standin
        ids = torch.randint(1, 128, (case.batch_size, prompt_len), generator=torch.Generator().manual_seed(args.seed))
        torch.manual_seed(args.seed)
        starts.clear()
        try:
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=case.do_sample, num_return_sequences=case.num_return_sequences, pad_token_id=0,
                )
        finally:
            _restore(previous)
        # starts[0] is the prompt's forward (two with hf_paged's split prefill on one side only):
        # keep the intervals between the last len - 2 forwards, decode steps on both sides.
        decode = starts[-(new_tokens - 1):]
        return out, [b - a for a, b in zip(decode, decode[1:])]

    sides = ("stock", "torch", "flashinfer-host")
    results = []
    for case in CASES:
        steps: dict[str, list[float]] = {side: [] for side in sides}
        tokens = {side: run(side, case)[0] for side in sides}  # warm-up
        for _ in range(args.reps):
            for side in sides:
                out, times = run(side, case)
                steps[side] += times
                tokens_match = torch.equal(out, tokens["stock"]) if side == "torch" else None
                if side == "torch" and not tokens_match:
                    raise RuntimeError(f"overhead {case.name}: the torch executor's tokens differ from stock's")
        step = {side: percentile(steps[side], PERCENTILE) for side in sides}
        results.append({
            "case": case.name,
            "batch_size": case.batch_size,
            "do_sample": case.do_sample,
            "num_return_sequences": case.num_return_sequences,
            "step_ms": {side: step[side] * 1e3 for side in sides},
            "added_us_per_layer_token": {
                side: (step[side] - step["stock"]) / layers * 1e6 for side in sides if side != "stock"
            },
            "num_steps": {side: len(steps[side]) for side in sides},
            "tokens_match": torch.equal(tokens["torch"], tokens["stock"]),
        })
    hf_paged.unwrap(paged)
    return {
        "model": {"layers": layers, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128},
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "reps": args.reps,
        "percentile": PERCENTILE,
        "clock": "thread_time",
        "results": results,
    }


def _restore(previous) -> None:
    if previous is None:
        sys.modules.pop("flashinfer", None)
    else:
        sys.modules["flashinfer"] = previous


def print_overhead(document: dict) -> None:
    model = document["model"]
    print(
        f"\noverhead: compute-free Llama ({model['layers']} layers, hidden {model['hidden']}), prompt "
        f"{document['prompt_len']}, {document['new_tokens']} new tokens; thread CPU time per decode step, "
        f"{document['percentile']}th percentile over {document['reps']} runs per side (interleaved)"
    )
    header = f"{'case':<26}{'stock ms':>9}{'torch ms':>9}{'+us/layer':>10}{'FI-host ms':>11}{'+us/layer':>10}  match"
    print(header)
    print("-" * len(header))
    for r in document["results"]:
        ms, added = r["step_ms"], r["added_us_per_layer_token"]
        print(
            f"{r['case']:<26}{ms['stock']:>9.3f}{ms['torch']:>9.3f}{added['torch']:>10.1f}"
            f"{ms['flashinfer-host']:>11.3f}{added['flashinfer-host']:>10.1f}  {r['tokens_match']}"
        )
