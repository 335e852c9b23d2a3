"""The windowed workloads of scripts/bench.py (`--windowed`): KV memory of sliding-window groups.

Gemma-3-style (6 layers, 5 sliding with window 128 : 1 full) and Mistral-style (every layer
sliding, window 256), one prompt of 1024 tokens, 32 new tokens; greedy and beam search with 4
beams. Stock keeps only the window on sliding layers (`DynamicSlidingWindowLayer`); its KV is the
most its DynamicCache holds after any forward. The paged side reports its peak per group (after
each forward, the same measure) and is timed against stock and against itself with every layer
in one full group (the paged path before groups). The pool peak is what the paged side's page
ids reserved at one instant, inside forwards too (`memory_stats()["peak_pool_bytes"]`: the
smallest pool that serves the call), against the same stock KV.
"""

import statistics
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_paged
from _bench_measure import stock_kv_bytes, timed_generate
from _bench_workloads import PAD_TOKEN_ID
from hf_paged.memory.groups import GroupSpec
from hf_paged.memory.pool import KVPool

# paged/stock KV ratio targets (issue 11)
TARGETS = {("gemma3", "greedy"): 1.05, ("gemma3", "beam4"): 0.35, ("mistral", "beam4"): 0.35}


@dataclass(frozen=True, slots=True)
class Windowed:
    model: str
    decoding: str
    prompt_len: int = 1024
    new_tokens: int = 32


WINDOWED = [Windowed("gemma3", "greedy"), Windowed("gemma3", "beam4"), Windowed("mistral", "beam4")]


WINDOWS = {"gemma3": 128, "mistral": 256}


def build_pair(kind: str, args, window: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stock and to-be-wrapped models sharing one set of random weights (fp32)."""
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=4096, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=None)
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(num_hidden_layers=6, sliding_window=window, head_dim=args.hidden // args.heads,
                                               **common)
    else:
        config = transformers.MistralConfig(num_hidden_layers=args.layers, sliding_window=window, **common)
    torch.manual_seed(args.seed)
    stock = AutoModelForCausalLM.from_config(config).eval()
    paged = AutoModelForCausalLM.from_config(config).eval()
    paged.load_state_dict(stock.state_dict(), assign=True)
    for model in (stock, paged):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = PAD_TOKEN_ID
    return stock, paged


def measure_windowed(case: Windowed, args, device: torch.device, quick: bool) -> dict:
    prompt_len, new_tokens = (48, 8) if quick else (case.prompt_len, case.new_tokens)
    # --quick: windows of 16 and 32, so that its short prompts still cross them.
    window = WINDOWS[case.model] // (8 if quick else 1)
    stock, paged = build_pair(case.model, args, window)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {"input_ids": torch.randint(1, args.vocab, (1, prompt_len), generator=generator)}
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,
                  num_beams=4 if case.decoding == "beam4" else 1)
    stock_tokens, stock_kv = stock_kv_bytes(stock, inputs, kwargs, args.seed)
    hf_paged.wrap(paged, page_size=args.page_size, num_pages=args.num_pages or 4 * (prompt_len + new_tokens),
                  kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    runtime = paged.hf_paged_runtime
    grouped = runtime.groups
    paged_tokens, _ = timed_generate(paged, inputs, kwargs, args.seed, device)
    stats = hf_paged.memory_stats(paged)
    reps = max(1, args.reps)
    times = {"stock": [], "paged": [], "one_group": []}
    # The paged path before groups: every layer in one full group keeps every token, in pages of page_size.
    grouped_pool = runtime.pool
    one_group = [GroupSpec(None, tuple(range(len(grouped_pool.pools))), runtime.config.page_size)]
    one_group_pool = KVPool(runtime.config, grouped_pool.specs)
    for _ in range(reps):
        times["stock"].append(timed_generate(stock, inputs, kwargs, args.seed, device)[1])
        runtime.groups, runtime.pool = grouped, grouped_pool
        times["paged"].append(timed_generate(paged, inputs, kwargs, args.seed, device)[1])
        runtime.groups, runtime.pool = one_group, one_group_pool
        times["one_group"].append(timed_generate(paged, inputs, kwargs, args.seed, device)[1])
    one_group_kv = hf_paged.memory_stats(paged)["peak_kv_bytes"]
    runtime.groups, runtime.pool = grouped, grouped_pool
    seconds = {side: statistics.median(values) for side, values in times.items()}
    target = None if quick else TARGETS.get((case.model, case.decoding))
    kv_ratio = stats["peak_kv_bytes"] / stock_kv
    pool_ratio = stats["peak_pool_bytes"] / stock_kv
    return {
        "workload": f"{case.model}-{case.decoding}",
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "stock_kv_bytes": stock_kv,
        "paged_kv_bytes": stats["peak_kv_bytes"],
        "one_group_kv_bytes": one_group_kv,
        "kv_ratio": kv_ratio,
        "paged_pool_bytes": stats["peak_pool_bytes"],
        "pool_ratio": pool_ratio,
        "groups": stats["groups"],
        "seconds": seconds,
        "time_ratio": seconds["paged"] / seconds["stock"],
        "time_vs_one_group": seconds["paged"] / seconds["one_group"],
        "tokens_match": bool(torch.equal(stock_tokens, paged_tokens)),
        "kv_target": target,
        "meets_target": None if target is None else bool(kv_ratio <= target and torch.equal(stock_tokens, paged_tokens)),
    }


def print_windowed(results: list[dict]) -> None:
    print("\nwindowed models (sliding-window groups)")
    header = (f"{'workload':<16}{'stock KV':>10}{'paged KV':>10}{'KV ratio':>9}{'target':>8}{'pool peak':>10}"
              f"{'pool ratio':>11}{'1-group KV':>11}"
              f"{'t ratio':>8}{'t vs 1-group':>13}  match  ok   per group (window: peak pages x page size x page bytes)")
    print(header)
    print("-" * len(header))
    for r in results:
        groups = ", ".join(
            f"{g['window'] or 'full'}: {g['peak_pages_in_use']} x {g['page_size']} tokens x {g['page_bytes']} B"
            for g in r["groups"]
        )
        target = "-" if r["kv_target"] is None else f"{r['kv_target']}"
        ok = {True: "yes", False: "NO", None: "-"}[r["meets_target"]]
        print(f"{r['workload']:<16}{r['stock_kv_bytes'] / 2**20:>9.2f}M{r['paged_kv_bytes'] / 2**20:>9.2f}M"
              f"{r['kv_ratio']:>9.3f}{target:>8}{r['paged_pool_bytes'] / 2**20:>9.2f}M{r['pool_ratio']:>11.3f}"
              f"{r['one_group_kv_bytes'] / 2**20:>10.2f}M{r['time_ratio']:>8.2f}"
              f"{r['time_vs_one_group']:>13.2f}  {str(r['tokens_match']):<6} {ok:<4} {groups}")
