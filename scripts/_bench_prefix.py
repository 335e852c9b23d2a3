"""The few-shot workload of scripts/bench.py (`--prefix-cache`): prefix caching across calls.

One shared prefix (1024 tokens: an instruction and examples) before 32 questions of 24 to 40
tokens, in batches of 4 left-padded prompts, 16 new tokens each, greedy. Stock runs every batch
from scratch; the wrapped model runs them with `PagedConfig(prefix_cache=True)` from an empty
cache (pass 1: the first batch computes the prefix, the others reuse it), then again (pass 2:
every full page of every prompt is found). A third run on distinct prompts (nothing to reuse)
compares the cache on and off. Each timing is one full pass, median of `reps` passes.
"""

import statistics
import time

import torch

import hf_paged
from _bench_workloads import PAD_TOKEN_ID

# paged/stock time ratio of pass 1 (issue 13).
TARGET_TIME_RATIO = 0.35


def few_shot_batches(vocab: int, seed: int, prefix_len: int, num_questions: int, batch_size: int,
                     distinct: bool = False) -> list[dict[str, torch.Tensor]]:
    """Batches of left-padded prompts `prefix + question`; `distinct` gives every prompt its own prefix."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, vocab, (prefix_len,), generator=generator)
    prompts = []
    for _ in range(num_questions):
        prefix = torch.randint(1, vocab, (prefix_len,), generator=generator) if distinct else shared
        length = int(torch.randint(24, 41, (1,), generator=generator))
        prompts.append(torch.cat([prefix, torch.randint(1, vocab, (length,), generator=generator)]))
    batches = []
    for start in range(0, num_questions, batch_size):
        group = prompts[start : start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), PAD_TOKEN_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(group):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def run_pass(model, batches: list[dict], new_tokens: int, device: torch.device) -> tuple[list[torch.Tensor], float]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            outputs.append(model.generate(**{k: v.to(device) for k, v in batch.items()}, **kwargs))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return outputs, time.perf_counter() - start


def reusable_tokens(batches: list[dict], page_size: int) -> int:
    """Tokens in the full pages before each prompt's last token: what a warm cache must find."""
    return sum(((int(n) - 1) // page_size) * page_size for b in batches for n in b["attention_mask"].sum(1))


def few_shot(stock, paged, args, device: torch.device, prefix_len: int = 1024, num_questions: int = 32,
             batch_size: int = 4, new_tokens: int = 16, apply_target: bool = True) -> dict:
    """Every number of the few-shot workload; `paged` is re-wrapped with the prefix cache on and off.

    `apply_target` False (a --quick or other-size run): no target and no verdict, `None` in both."""
    batches = few_shot_batches(args.vocab, args.seed, prefix_len, num_questions, batch_size)
    distinct = few_shot_batches(args.vocab, args.seed + 1, prefix_len, num_questions, batch_size, distinct=True)
    page_size = args.page_size
    reps = max(1, args.reps)
    stock_out, _ = run_pass(stock, batches, new_tokens, device)  # warm-up and the reference tokens
    stock_times = [run_pass(stock, batches, new_tokens, device)[1] for _ in range(reps)]

    hf_paged.wrap(paged, page_size=page_size, prefix_cache=True, cascade=not args.no_cascade)
    cold, warm, match, warm_hits = [], [], True, []
    for _ in range(reps):
        hf_paged.clear_prefix_cache(paged)
        out, seconds = run_pass(paged, batches, new_tokens, device)
        cold.append(seconds)
        match &= all(torch.equal(a, b) for a, b in zip(out, stock_out))
        before = hf_paged.memory_stats(paged)["prefix_hit_tokens"]
        out, seconds = run_pass(paged, batches, new_tokens, device)
        warm.append(seconds)
        warm_hits.append(hf_paged.memory_stats(paged)["prefix_hit_tokens"] - before)
        match &= all(torch.equal(a, b) for a, b in zip(out, stock_out))
    distinct_on = [run_pass(paged, distinct, new_tokens, device)[1] for _ in range(reps)]
    hf_paged.wrap(paged, page_size=page_size, prefix_cache=False, cascade=not args.no_cascade)
    distinct_off = [run_pass(paged, distinct, new_tokens, device)[1] for _ in range(reps)]
    expected_hits = reusable_tokens(batches, page_size)
    stock_s = statistics.median(stock_times)
    result = {
        "shape": dict(prefix_len=prefix_len, num_questions=num_questions, batch_size=batch_size, new_tokens=new_tokens),
        "stock_s": stock_s,
        "paged_cold_s": statistics.median(cold),
        "paged_warm_s": statistics.median(warm),
        "time_ratio_cold": statistics.median(cold) / stock_s,
        "time_ratio_warm": statistics.median(warm) / stock_s,
        "tokens_match": bool(match),
        "warm_hit_tokens": warm_hits[-1],
        "warm_reusable_tokens": expected_hits,
        "distinct_on_s": statistics.median(distinct_on),
        "distinct_off_s": statistics.median(distinct_off),
        "target_time_ratio": TARGET_TIME_RATIO if apply_target else None,
        "meets_targets": None,
    }
    if apply_target:
        result["meets_targets"] = bool(
            match and result["time_ratio_cold"] <= TARGET_TIME_RATIO and warm_hits[-1] == expected_hits
        )
    return result


def print_few_shot(result: dict) -> None:
    s = result["shape"]
    print(f"\nfew-shot: prefix {s['prefix_len']}, {s['num_questions']} questions, batches of {s['batch_size']}, "
          f"{s['new_tokens']} new tokens, greedy")
    target = "" if result["target_time_ratio"] is None else f", target <= {result['target_time_ratio']}"
    print(f"  stock {result['stock_s']:.2f} s | prefix cache, pass 1 (cold) {result['paged_cold_s']:.2f} s "
          f"(ratio {result['time_ratio_cold']:.2f}{target}) | "
          f"pass 2 (warm) {result['paged_warm_s']:.2f} s (ratio {result['time_ratio_warm']:.2f})")
    print(f"  pass 2 hit {result['warm_hit_tokens']} of {result['warm_reusable_tokens']} reusable prompt tokens; "
          f"same tokens as stock: {result['tokens_match']}")
    print(f"  distinct prompts (nothing to reuse): cache on {result['distinct_on_s']:.2f} s, "
          f"off {result['distinct_off_s']:.2f} s (ratio {result['distinct_on_s'] / result['distinct_off_s']:.2f})")
    if result["meets_targets"] is not None:
        print(f"  meets targets: {'yes' if result['meets_targets'] else 'NO'}")
