"""Paged vs stock generate(): time, time to first token, KV bytes, peak memory, same tokens.

Both sides run the same random-weight Llama-style model (two model objects sharing one set of
weight tensors: stock keeps sdpa + DynamicCache, the other is `hf_paged.wrap`ped) on the same
inputs in one process, alternating A B A B after a warm-up; times are medians. Peak memory runs
each side once more in its own subprocess (see scripts/_bench_measure.py for what is measured).

    python scripts/bench.py --workload all --json bench.json --plot bench.png
    python scripts/bench.py --quick --workload summarize --no-memory
    python scripts/bench.py --workload none --prefix-cache   # the few-shot prefix-caching workload only
    python scripts/bench.py --workload none --windowed       # the sliding-window workloads only
    python scripts/bench.py --workload none --seq2seq        # translation, summarization, speech (encoder-decoder)
    python scripts/bench.py --workload overhead              # host time added per layer and token
    python scripts/bench.py --workload summarize,wide-beam --dtype bfloat16 --kv-cache-dtype fp8_e4m3 --no-memory
"""

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from typing import NoReturn

import torch

import hf_paged

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_fp8 import compare_kv_dtypes, print_kv_dtypes  # noqa: E402
from _bench_measure import child_peak_memory, measure  # noqa: E402
from _bench_overhead import measure_overhead, print_overhead  # noqa: E402
from _bench_prefix import few_shot, print_few_shot  # noqa: E402
from _bench_seq2seq import SEQ2SEQ, measure_seq2seq, print_seq2seq  # noqa: E402
from _bench_windowed import WINDOWED, measure_windowed, print_windowed  # noqa: E402
from _bench_workloads import WORKLOADS, build_model_pair, select_workloads  # noqa: E402

# paged/stock targets on CPU (issue 3): (time ratio, KV bytes ratio).
TARGETS = {
    "summarize": (0.5, 0.4),
    "wide-beam": (0.35, 0.2),
    "multi-sample": (0.5, 0.3),
    "greedy": (1.0, 1.05),
    "ragged": (0.5, 0.4),
}
RATIO_FIELDS = ("time_s", "tokens_per_s", "ttft_s", "kv_bytes", "peak_mem_bytes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workload", default="all",
        help=f"'all' or comma-separated: {', '.join(WORKLOADS)}, or 'overhead' (a compute-free model: host "
        "time added per layer and token, see scripts/_bench_overhead.py; not part of 'all')",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=3, help="timed runs per side (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1, the same on every machine, so tables compare across machines; "
        "0: torch's default, one per core)",
    )
    model = parser.add_argument_group("model shape")
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--hidden", type=int, default=512)
    model.add_argument("--intermediate", type=int, default=1408)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--vocab", type=int, default=32000)
    sizes = parser.add_argument_group("workload sizes (override every selected workload)")
    sizes.add_argument("--batch-size", type=int)
    sizes.add_argument("--prompt-len", type=int)
    sizes.add_argument("--new-tokens", type=int)
    sizes.add_argument("--num-beams", type=int)
    sizes.add_argument("--num-return-sequences", type=int)
    paged = parser.add_argument_group("paged cache")
    paged.add_argument("--page-size", type=int, default=16)
    paged.add_argument("--num-pages", type=int, default=0, help="pool pages (0: enough with no sharing)")
    paged.add_argument("--no-cascade", action="store_true", help="PagedConfig(cascade=False)")
    paged.add_argument("--exact", action="store_true",
                       help="PagedConfig(exact=True): stock's arithmetic, fp32 logits bit for bit (docs/numerics.md)")
    paged.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3", "fp8_e5m2"),
                       help="PagedConfig(kv_cache_dtype=...); fp8 also times each workload with auto pages "
                       "and reports time and peak pool bytes fp8 / auto (docs/fp8.md)")
    out = parser.add_argument_group("output")
    out.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    out.add_argument("--json", metavar="PATH", help="write every number as JSON")
    out.add_argument("--plot", metavar="PATH", help="PNG of time and KV bytes vs num_beams")
    out.add_argument("--windowed", action="store_true",
                     help="also run the sliding-window workloads (Gemma-3-style 5:1 window 128, Mistral-style window 256)")
    out.add_argument("--seq2seq", action="store_true",
                     help="also run the encoder-decoder workloads: translation (Marian, source 60, target 60, 6 beams), "
                     "summarization (BART, 1,024 / 142, 4 beams), speech (Whisper, 1,500 frames / 100, 5 beams)")
    out.add_argument("--prefix-cache", action="store_true",
                     help="also run the few-shot workload (shared 1024-token prefix) with PagedConfig(prefix_cache=True)")
    out.add_argument("--beams", default=None, help="num_beams sweep for --plot (default 1,2,4,8,16)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.workload.split(",")]
    known = [*WORKLOADS, "overhead"]
    unknown = [name for name in names if name not in known] if args.workload not in ("all", "none") else []
    if unknown:
        fail(f"unknown workload(s) {unknown}; expected 'all', 'none' or some of {known} (comma-separated)")
    if args.num_pages < 0 or args.page_size < 1:
        fail(f"expected --num-pages >= 0 (0: enough with no sharing) and --page-size >= 1, got {args.num_pages} and {args.page_size}")
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab = 2, 64, 128, 128
        args.heads, args.kv_heads = 4, 2
        args.reps = min(args.reps, 2)
        args.page_size = min(args.page_size, 4)
    return args


def fail(message: str) -> NoReturn:
    """Bad input or a pool too small for the run: one line on stderr, exit code 2 (as scripts/eval.py)."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    raise SystemExit(2)


def targets_skipped(args: argparse.Namespace) -> str | None:
    """Why the targets do not apply to this run, or None: they were set for the full-size workloads and
    model on CPU in float32 (the defaults), so a smoke run or another shape is never called a failure."""
    defaults = parse_args([])
    reasons = ["--quick"] if args.quick else []
    reasons += ["--exact"] if args.exact else []  # no prompt sharing: the beam targets were set without it
    reasons += ["--kv-cache-dtype"] if args.kv_cache_dtype != "auto" else []  # rounded K/V: other tokens than stock's
    reasons += [f"--{name.replace('_', '-')}" for name in ("batch_size", "prompt_len", "new_tokens", "num_beams", "num_return_sequences")
                if getattr(args, name) is not None]
    reasons += [f"--{name.replace('_', '-')}" for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype", "device")
                if not args.quick and getattr(args, name) != getattr(defaults, name)]
    return f"targets apply to the default CPU float32 run, not with {', '.join(reasons)}" if reasons else None


def add_ratios(result: dict, apply_targets: bool = True) -> dict:
    """paged/stock for every numeric field, and whether the workload's targets are met (where they apply)."""
    stock, paged = result["stock"], result["paged"]
    result["ratios"] = {
        name: (paged[name] / stock[name] if stock[name] and paged[name] is not None else None)
        for name in RATIO_FIELDS
    }
    target = TARGETS.get(result["workload"]["name"]) if apply_targets else None
    result["targets"] = {"time_s": target[0], "kv_bytes": target[1]} if target else None
    if target:
        result["meets_targets"] = bool(
            result["tokens_match"]
            and result["ratios"]["time_s"] <= target[0]
            and result["ratios"]["kv_bytes"] <= target[1]
        )
    else:
        result["meets_targets"] = None
    return result


def beam_sweep(beams: list[int], base, stock, paged, args, device, progress) -> list[dict]:
    """The wide-beam shape at each num_beams: time and KV bytes of both sides (no peak memory)."""
    points = []
    for num_beams in beams:
        workload = replace(base, name=f"beams-{num_beams}", num_beams=num_beams)
        result = add_ratios(measure(workload, stock, paged, args, device, progress, with_memory=False), False)
        points.append(result)
    return points


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: list[dict]) -> None:
    header = (
        f"{'workload':<13}{'side':<6}{'time s':>8}{'tok/s':>9}{'ttft s':>8}{'KV':>10}{'peak mem':>10}"
        f"  {'match':<6}{'target t/kv':<12}{'ok':<4}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        name = result["workload"]["name"]
        for side in ("stock", "paged"):
            row = result[side]
            print(
                f"{name if side == 'stock' else '':<13}{side:<6}{row['time_s']:>8.3f}{row['tokens_per_s']:>9.1f}"
                f"{row['ttft_s']:>8.3f}{fmt_bytes(row['kv_bytes']):>10}{fmt_bytes(row['peak_mem_bytes']):>10}"
            )
        r = result["ratios"]
        target = result["targets"]
        target_text = f"{target['time_s']}/{target['kv_bytes']}" if target else "-"
        ok = {True: "yes", False: "NO", None: "-"}[result["meets_targets"]]
        print(
            f"{'':<13}{'ratio':<6}{fmt_ratio(r['time_s']):>8}{fmt_ratio(r['tokens_per_s']):>9}"
            f"{fmt_ratio(r['ttft_s']):>8}{fmt_ratio(r['kv_bytes']):>10}{fmt_ratio(r['peak_mem_bytes']):>10}"
            f"  {str(result['tokens_match']):<6}{target_text:<12}{ok:<4}"
        )


def plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beams = [p["workload"]["num_beams"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("stock", "o-"), ("paged", "s-")):
        left.plot(beams, [p[side]["time_s"] for p in points], style, label=side)
        right.plot(beams, [p[side]["kv_bytes"] / 2**20 for p in points], style, label=side)
    base = points[0]["workload"]
    title = f"batch {base['batch_size']}, prompt {base['prompt_len']}, {base['new_tokens']} new"
    left.set(xlabel="num_beams", ylabel="generate() time, s", title=title, xscale="log", xticks=beams)
    right.set(xlabel="num_beams", ylabel="peak KV, MiB", title=title, xscale="log", xticks=beams)
    for axis in (left, right):
        axis.set_xticklabels([str(b) for b in beams])
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(child_peak_memory(json.loads(args._child))))
        return None
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = {
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "num_beams": args.num_beams,
        "num_return_sequences": args.num_return_sequences,
    }
    names = [name.strip() for name in args.workload.split(",")]
    with_overhead = "overhead" in names
    names = [name for name in names if name != "overhead"]
    workloads = select_workloads(",".join(names) if names else "none", sizes, args.quick)
    beams = [int(b) for b in (args.beams or ("1,2,4" if args.quick else "1,2,4,8,16")).split(",")] if args.plot else []
    needs_pair = workloads or beams or args.prefix_cache
    stock, paged = build_model_pair(args, device) if needs_pair else (None, None)
    steps = (4 * args.reps + 2 + (0 if args.no_memory else 2)) * len(workloads) + (4 * args.reps + 2) * len(beams)
    started = time.time()
    skipped = targets_skipped(args)
    try:
        with tqdm(total=steps, desc="bench", unit="run") as progress:
            results = [add_ratios(measure(w, stock, paged, args, device, progress), skipped is None) for w in workloads]
            sweep_base = select_workloads("wide-beam", sizes, args.quick)[0]
            points = beam_sweep(beams, sweep_base, stock, paged, args, device, progress) if beams else []
        overhead = measure_overhead(args, args.quick) if with_overhead else None
        windowed = [measure_windowed(case, args, device, args.quick) for case in WINDOWED] if args.windowed else None
        seq2seq = [measure_seq2seq(case, args, args.quick, skipped is None) for case in SEQ2SEQ] if args.seq2seq else None
        kv_dtypes = compare_kv_dtypes(workloads, paged, args, device) if workloads and args.kv_cache_dtype != "auto" else None
        few = None
        if args.prefix_cache:
            shape = dict(prefix_len=64, num_questions=8) if args.quick else {}
            few = few_shot(stock, paged, args, device, apply_target=skipped is None, **shape)
    except hf_paged.OutOfPagesError as error:
        fail(f"out of pages: {error} (flags: --num-pages, 0 sizes the pool for the workload; --page-size, --batch-size, "
             "--prompt-len, --new-tokens, --num-beams, --num-return-sequences)")
    model_info = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype")}
    # As the wrapped model resolves it (on for torch, off for FlashInfer); None when no workload wrapped it.
    cascade = hf_paged.PagedCache(paged).cascade if paged is not None and hasattr(paged, "hf_paged_runtime") else None
    document = {
        "machine": machine_info(device),
        "model": model_info,
        "config": {"page_size": args.page_size, "cascade": cascade, "exact": args.exact, "reps": args.reps, "seed": args.seed,
                   "kv_cache_dtype": args.kv_cache_dtype},
        "targets_skipped": skipped,
        "elapsed_s": time.time() - started,
        "results": results,
        "beam_sweep": points,
        "few_shot": few,
        "windowed": windowed,
        "seq2seq": seq2seq,
        "overhead": overhead,
        "kv_dtypes": kv_dtypes,
    }
    print(f"\nmodel {model_info}, page_size {args.page_size}, cascade {cascade}, exact {args.exact}, "
          f"{args.reps} reps, {document['machine']['processor']} x{os.cpu_count()}, load {document['machine']['load_avg']}")
    if results:
        print_table(results)
    if skipped:
        print(f"({skipped})")
    if kv_dtypes:
        print_kv_dtypes(kv_dtypes)
    if points:
        print("\nnum_beams sweep (wide-beam shape)")
        print_table(points)
    if few is not None:
        print_few_shot(few)
    if windowed is not None:
        print_windowed(windowed)
    if seq2seq is not None:
        print_seq2seq(seq2seq)
    if overhead is not None:
        print_overhead(overhead)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
        print(f"JSON: {args.json}")
    if args.plot and points:
        plot(points, args.plot)
        print(f"plot: {args.plot}")
    return document


if __name__ == "__main__":
    main()
