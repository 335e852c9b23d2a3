"""Measurements for scripts/bench.py: wall time, KV bytes held, peak memory of one generate().

KV bytes. Paged: `peak_pages_in_use * page_bytes` (hf_paged.memory_stats). Stock: the bytes held
by the DynamicCache's key/value tensors after each forward, maximum over the run (a forward hook
reads them; beam search holds batch*beams rows of prompt+t tokens). Transient copies inside a
forward (torch.cat, the reorder's index_select) are not counted on either side; they show in the
peak-memory column instead.

Peak memory. RSS is a per-process high-water mark, so each side runs in its own fresh
subprocess (`bench.py --_child`): build the model, warm up, reset the kernel's high-water mark
(`/proc/self/clear_refs` 5; Linux >= 4.0), run one generate(), report VmHWM minus VmRSS before
the call. The subprocess runs with glibc's mmap threshold fixed at 128 KiB
(`MALLOC_MMAP_THRESHOLD_`), so every tensor larger than that is mapped and unmapped on its own:
the high-water mark then tracks live tensors, not what the heap happened to retain (with glibc's
default adaptive threshold the same run varied by tens of MiB). The paged side re-wraps after its warm-up so its pool pages start untouched (the CPU
pool is `torch.empty`: a page costs RSS once written). On CUDA: `max_memory_allocated` over the
call minus allocated before, plus the pool's bytes for the paged side (reserved up front).
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import hf_paged
from hf_paged import _compat
from hf_paged.integration.stats import cache_kv_bytes

from _bench_workloads import Workload, build_model_pair, generate_kwargs, make_inputs, pages_needed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, inputs: dict, kwargs: dict, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """One seeded generate(); returns the sequences `[rows_out, prompt + new]` int64 and seconds."""
    torch.manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return sequences, seconds


def stock_kv_bytes(model, inputs: dict, kwargs: dict, seed: int) -> tuple[torch.Tensor, int]:
    """Run stock generate() once; the largest bytes its DynamicCache held after any forward."""
    peak = 0

    def hook(module, args, output):
        nonlocal peak
        cache = _compat.output_cache(output)
        if cache is None:
            return
        peak = max(peak, cache_kv_bytes(cache))

    handle = model.register_forward_hook(hook)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            sequences = model.generate(**inputs, **kwargs)
    finally:
        handle.remove()
    return sequences, peak


def wrap_for(model, workload: Workload, args) -> None:
    """(Re-)wrap `model` with a pool big enough for `workload` without any sharing."""
    num_pages = args.num_pages or pages_needed(workload, args.page_size)
    cascade = False if args.no_cascade else None
    hf_paged.wrap(model, page_size=args.page_size, num_pages=num_pages, cascade=cascade, exact=args.exact,
                  kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))


def alternate(runs: dict, reps: int, progress) -> dict[str, list[float]]:
    """Run `runs[side]()` (each returns seconds) A B A B ... `reps` times; the seconds per side."""
    times: dict[str, list[float]] = {side: [] for side in runs}
    for _ in range(reps):
        for side, run in runs.items():
            times[side].append(run())
            progress.update(1)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- peak memory, one side per subprocess -----------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def child_peak_memory(spec: dict) -> dict:
    """In a fresh process: peak extra memory of one generate() of `spec["side"]` (bytes)."""
    from types import SimpleNamespace

    args = SimpleNamespace(**spec["args"])
    workload = Workload(**spec["workload"])
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    stock, paged = build_model_pair(args, device)
    model = stock if spec["side"] == "stock" else paged
    stock = paged = None
    gc.collect()
    inputs = make_inputs(workload, args.vocab, args.seed, device)
    kwargs = generate_kwargs(workload)
    if spec["side"] == "paged":
        wrap_for(model, workload, args)
    warm = {k: v[:, -min(8, v.shape[1]):] for k, v in inputs.items()}
    timed_generate(model, warm, generate_kwargs(workload, 2), args.seed, device)
    if spec["side"] == "paged":
        hf_paged.unwrap(model)
        gc.collect()
        wrap_for(model, workload, args)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        timed_generate(model, inputs, kwargs, args.seed, device)
        extra = torch.cuda.max_memory_allocated(device) - before
        if spec["side"] == "paged":
            extra += hf_paged.memory_stats(model)["pool_bytes"]
        return {"peak_mem_bytes": int(extra), "method": "cuda max_memory_allocated"}
    has_reset = _reset_hwm()
    before = _proc_status_kib("VmRSS")
    timed_generate(model, inputs, kwargs, args.seed, device)
    hwm = _proc_status_kib("VmHWM")
    if not has_reset or before is None or hwm is None:
        import resource

        return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "method": "ru_maxrss"}
    return {"peak_mem_bytes": (hwm - before) * 1024, "peak_rss_bytes": hwm * 1024, "method": "VmHWM - VmRSS"}


def peak_memory(side: str, workload: Workload, args) -> dict:
    """Run `child_peak_memory` for one side in a subprocess of this script."""
    spec = {"side": side, "workload": workload.as_dict(), "args": vars(args)}
    command = [sys.executable, sys.argv[0], "--_child", json.dumps(spec)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess for {side}/{workload.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(workload: Workload, stock, paged, args, device: torch.device, progress, with_memory: bool = True) -> dict:
    """Every number of one workload, both sides. See the module docstring for what each means.

    `peak_mem_bytes` is None without `with_memory` (or with `--no-memory`).
    """
    inputs = make_inputs(workload, args.vocab, args.seed, device)
    kwargs = generate_kwargs(workload)
    kwargs_ttft = generate_kwargs(workload, 1)
    wrap_for(paged, workload, args)
    # Warm-up, tokens and KV bytes.
    stock_tokens, stock_kv = stock_kv_bytes(stock, inputs, kwargs, args.seed)
    paged_tokens, _ = timed_generate(paged, inputs, kwargs, args.seed, device)
    stats = hf_paged.memory_stats(paged)
    progress.update(2)
    full = alternate(
        {
            "stock": lambda: timed_generate(stock, inputs, kwargs, args.seed, device)[1],
            "paged": lambda: timed_generate(paged, inputs, kwargs, args.seed, device)[1],
        },
        args.reps,
        progress,
    )
    first = alternate(
        {
            "stock": lambda: timed_generate(stock, inputs, kwargs_ttft, args.seed, device)[1],
            "paged": lambda: timed_generate(paged, inputs, kwargs_ttft, args.seed, device)[1],
        },
        args.reps,
        progress,
    )
    memory = {}
    if with_memory and not args.no_memory:
        for side in ("stock", "paged"):
            memory[side] = peak_memory(side, workload, args)
            progress.update(1)
    generated = workload.returned_rows * workload.new_tokens
    sides = {}
    for side in ("stock", "paged"):
        seconds = median(full[side])
        sides[side] = {
            "time_s": seconds,
            "times_s": full[side],
            "tokens_per_s": generated / seconds,
            "ttft_s": median(first[side]),
            "kv_bytes": int(stock_kv if side == "stock" else stats["peak_kv_bytes"]),
            "peak_mem_bytes": memory[side]["peak_mem_bytes"] if memory else None,
        }
    sides["paged"].update(
        page_size=stats["page_size"],
        page_bytes=stats["page_bytes"],
        pool_bytes=stats["pool_bytes"],
        peak_pages_in_use=stats["peak_pages_in_use"],
        peak_shared_pages=stats["peak_shared_pages"],
    )
    return {
        "workload": workload.as_dict(),
        "generated_tokens": generated,
        "tokens_match": bool(torch.equal(stock_tokens.cpu(), paged_tokens.cpu())),
        "memory_method": memory.get("stock", {}).get("method"),
        "stock": sides["stock"],
        "paged": sides["paged"],
    }
