"""fp8 pages against pages in the model's dtype (`scripts/bench.py --kv-cache-dtype fp8_e4m3`).

The same wrapped model runs each selected workload with `kv_cache_dtype="auto"` and with the fp8
dtype asked for, alternating A B A B after a warm-up of each (re-wrapped between runs, outside the
timed region); times are medians. `peak_pool_bytes` is `memory_stats()["peak_pool_bytes"]`, the
bytes the call's pages reserved at its peak (docs/fp8.md); `rows_equal` the fraction of returned
rows whose tokens equal those of the "auto" pages.
"""

import statistics

import hf_paged
import torch

from _bench_measure import timed_generate
from _bench_workloads import generate_kwargs, make_inputs, pages_needed


def wrap_with(model, workload, args, kv_cache_dtype: str) -> None:
    num_pages = args.num_pages or pages_needed(workload, args.page_size)
    cascade = False if args.no_cascade else None
    hf_paged.wrap(model, page_size=args.page_size, num_pages=num_pages, cascade=cascade, kv_cache_dtype=kv_cache_dtype)


def compare_kv_dtypes(workloads: list, paged, args, device: torch.device) -> list[dict]:
    """Per workload: both dtypes' median time, peak pool bytes, and the ratios fp8 / auto."""
    dtypes = ("auto", args.kv_cache_dtype)
    results = []
    for workload in workloads:
        inputs = make_inputs(workload, args.vocab, args.seed, device)
        kwargs = generate_kwargs(workload)
        tokens, peaks, times = {}, {}, {dtype: [] for dtype in dtypes}
        for dtype in dtypes:  # warm-up, tokens and peaks
            wrap_with(paged, workload, args, dtype)
            tokens[dtype], _ = timed_generate(paged, inputs, kwargs, args.seed, device)
            peaks[dtype] = hf_paged.memory_stats(paged)["peak_pool_bytes"]
        for _ in range(args.reps):
            for dtype in dtypes:
                wrap_with(paged, workload, args, dtype)
                times[dtype].append(timed_generate(paged, inputs, kwargs, args.seed, device)[1])
        seconds = {dtype: statistics.median(times[dtype]) for dtype in dtypes}
        same = (tokens["auto"].cpu() == tokens[dtypes[1]].cpu()).all(dim=1)
        results.append({
            "workload": workload.name,
            "kv_cache_dtype": dtypes[1],
            "auto_time_s": seconds["auto"],
            "fp8_time_s": seconds[dtypes[1]],
            "times_s": times,
            "time_ratio": seconds[dtypes[1]] / seconds["auto"],
            "auto_peak_pool_bytes": peaks["auto"],
            "fp8_peak_pool_bytes": peaks[dtypes[1]],
            "pool_ratio": peaks[dtypes[1]] / peaks["auto"],
            "rows_equal": float(same.float().mean()),
        })
    hf_paged.wrap(paged, page_size=args.page_size, kv_cache_dtype=args.kv_cache_dtype)  # as the caller left it
    return results


def print_kv_dtypes(results: list[dict]) -> None:
    print(f"\nfp8 pages vs auto pages (same wrapped model; ratios fp8 / auto; {results[0]['kv_cache_dtype']})")
    header = f"{'workload':<14}{'auto s':>9}{'fp8 s':>9}{'time':>7}{'auto pool':>12}{'fp8 pool':>12}{'pool':>7}{'rows equal':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['workload']:<14}{r['auto_time_s']:>9.3f}{r['fp8_time_s']:>9.3f}{r['time_ratio']:>7.2f}"
              f"{r['auto_peak_pool_bytes'] / 2**20:>11.2f}M{r['fp8_peak_pool_bytes'] / 2**20:>11.2f}M"
              f"{r['pool_ratio']:>7.3f}{r['rows_equal']:>12.2f}")
