"""One rank of tests/test_tensor_parallel.py: `torchrun --nproc_per_node 2 tests/tp_worker.py MODELS OUT`.

Loads each saved tiny model of MODELS (a folder of `save_pretrained` folders, one per family, and
`mqa`: one KV head) with transformers' TP 2 on CPU (gloo), runs tp_cases.CASES stock and wrapped,
and the agreement checks (a rank-dependent budget, a failure on one rank in wrap() and in a
forward). Writes what it saw to OUT/rank{rank}.json; the test asserts on it.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_paged  # noqa: E402
from hf_paged.memory import pool as pool_module  # noqa: E402
from hf_paged.distributed import tensor_parallel  # noqa: E402
from hf_paged.cache.paged_cache import PagedCache  # noqa: E402
from tp_cases import CASES, FAMILIES, FP8_SCALES, NUM_PAGES, PAGE_SIZE, run_case  # noqa: E402


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2)).eval()


def outcome(call) -> dict:
    """{"error": class name, "message": ...} of what `call()` raised, or {"error": None, "value": ...}."""
    try:
        return {"error": None, "value": call()}
    except Exception as error:  # the test asserts on the class and message
        return {"error": type(error).__name__, "message": str(error)}


def run_family(model: torch.nn.Module) -> dict:
    """Stock TP tokens, then wrapped: the tokens and memory_stats of each case."""
    result = {"stock": {name: run_case(model, name) for name in CASES}, "paged": {}, "stats": {}}
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    for name in CASES:
        result["paged"][name] = run_case(model, name)
        stats = hf_paged.memory_stats(model)
        result["stats"][name] = {key: value for key, value in stats.items() if key != "groups"}
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE, prefix_cache=True)
    result["prefix_cache"] = [run_case(model, "greedy") for _ in range(2)]  # the second call hits
    result["prefix_hits"] = hf_paged.memory_stats(model)["prefix_hits"]
    # fp8 pages: given scales, then each rank's own from its heads' first forward.
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE, kv_cache_dtype="fp8_e4m3", kv_scales=FP8_SCALES)
    result["fp8"] = run_case(model, "greedy")
    result["fp8_pool_bytes"] = hf_paged.memory_stats(model)["pool_bytes"]
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE, kv_cache_dtype="fp8_e4m3")
    run_case(model, "greedy")
    result["fp8_scales"] = hf_paged.memory_stats(model)["kv_scales"]
    hf_paged.unwrap(model)
    return result


def agreement_checks(model: torch.nn.Module, rank: int) -> dict:
    """What each rank sees when the ranks differ: budget, a failure in wrap(), a failure in a forward."""
    checks = {}
    # Each rank's free memory differs: every rank gets the pages of the smallest budget.
    original_free = pool_module.free_memory_bytes
    pool_module.free_memory_bytes = lambda device: (rank + 1) * 2**22
    try:
        hf_paged.wrap(model, max_memory=0.5, page_size=PAGE_SIZE)
    finally:
        pool_module.free_memory_bytes = original_free
    checks["budget_num_pages"] = hf_paged.memory_stats(model)["num_pages"]
    checks["budget_tokens"] = run_case(model, "greedy")
    hf_paged.unwrap(model)

    # Rank 1 cannot size its pool: both ranks raise, neither wraps.
    original_choose = tensor_parallel.choose_num_pages

    def refuse(*args, **kwargs):
        raise ValueError("this rank's budget is below one page (test)")

    if rank == 1:
        tensor_parallel.choose_num_pages = refuse
    try:
        checks["wrap_failure"] = outcome(lambda: hf_paged.wrap(model, page_size=PAGE_SIZE) and None)
    finally:
        tensor_parallel.choose_num_pages = original_choose
    checks["wrapped_after_wrap_failure"] = getattr(model, "hf_paged_runtime", None) is not None

    # Rank 1 runs out of pages at its third forward: both ranks raise, every page returns, the next call works.
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    original_begin = PagedCache.begin_forward
    calls = {"n": 0}

    def fail_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise hf_paged.OutOfPagesError(99, 0, NUM_PAGES)
        return original_begin(self, *args, **kwargs)

    if rank == 1:
        PagedCache.begin_forward = fail_third
    try:
        checks["forward_failure"] = outcome(lambda: run_case(model, "greedy"))
    finally:
        PagedCache.begin_forward = original_begin
    checks["pages_in_use_after_failure"] = hf_paged.memory_stats(model)["pages_in_use"]
    checks["tokens_after_failure"] = run_case(model, "greedy")
    hf_paged.unwrap(model)
    return checks


def main() -> None:
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    report = {"families": {}}
    for family in FAMILIES:
        model = load(models / family)
        report["families"][family] = run_family(model)
        if family == "llama":
            report["agreement"] = agreement_checks(model, dist.get_rank())
    # One KV head cannot be split over two ranks: a clear error from wrap(), on every rank.
    mqa = load(models / "mqa")
    report["mqa"] = outcome(lambda: hf_paged.wrap(mqa) and None)
    rank = dist.get_rank()
    report["rank"] = rank
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
