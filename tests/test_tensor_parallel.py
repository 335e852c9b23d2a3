"""Tensor parallelism: transformers' own TP 2 on CPU (two gloo processes under torchrun).

One launch (its startup is the cost) of tests/tp_worker.py checks every case; this process
computes what the ranks must give: the single-process, unwrapped model's tokens, and the
single-process pool's bytes (each rank's pool holds its half of the KV heads). The pool-size
agreement is also checked in the quick loop, with threads as ranks of a stubbed process group.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers

import hf_paged
from hf_paged.distributed.tensor_parallel import TPGroup, local_specs, make_pool, tp_group
from threads import run_threads
from tiny import COMMON, SMALL, tiny_model
from tp_cases import CASES, FAMILIES, FP8_SCALES, NUM_PAGES, PAGE_SIZE, run_case

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _save_models(folder: Path) -> None:
    for family in FAMILIES:
        tiny_model(family).save_pretrained(folder / family)
    torch.manual_seed(0)  # one KV head: cannot be split over two ranks
    config = transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 1}, **COMMON)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "mqa")


def _single_process(family: str) -> dict:
    """Stock tokens of every case, and the wrapped single-process pool's bytes and peaks."""
    model = tiny_model(family)
    expected = {"tokens": {name: run_case(model, name) for name in CASES}, "peak_kv_bytes": {}}
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    for name in CASES:
        assert run_case(model, name) == expected["tokens"][name]  # the single-process paged path, as a baseline
        stats = hf_paged.memory_stats(model)
        expected["peak_kv_bytes"][name] = stats["peak_kv_bytes"]
    expected["pool_bytes"] = stats["pool_bytes"]
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE, kv_cache_dtype="fp8_e4m3", kv_scales=FP8_SCALES)
    expected["fp8"] = run_case(model, "greedy")
    hf_paged.wrap(model, num_pages=NUM_PAGES, page_size=PAGE_SIZE, kv_cache_dtype="fp8_e4m3")
    run_case(model, "greedy")
    expected["fp8_scales"] = hf_paged.memory_stats(model)["kv_scales"]
    # What one rank's pool must hold, from the config: half the KV heads, a page of PAGE_SIZE tokens
    # per full-attention layer (these families have at most one sliding layer per full one, and a
    # page id's sliding pages are packed into its full layers' pages: hf_paged/memory/layout.py).
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    slots = PAGE_SIZE * layer_types.count("full_attention")
    expected["local_pool_bytes"] = NUM_PAGES * slots * 2 * (config.num_key_value_heads // 2) * head_dim * 4
    return expected


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Both ranks' reports of one torchrun launch of tests/tp_worker.py."""
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    folder = tmp_path_factory.mktemp("tp")
    _save_models(folder / "models")
    (folder / "out").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # A rank that hangs in a collective would hang the launch: the timeout turns that into a failure.
    result = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", "2", str(TESTS / "tp_worker.py"),
         str(folder / "models"), str(folder / "out")],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((folder / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_tp2_gives_single_process_tokens_with_half_the_kv_bytes_per_rank(tp_run):
    for family in FAMILIES:
        expected = _single_process(family)
        for rank, report in enumerate(tp_run):
            seen = report["families"][family]
            for name in CASES:
                where = f"{family}, {name}, rank {rank}"
                assert seen["stock"][name] == expected["tokens"][name], f"stock TP differs from one process: {where}"
                assert seen["paged"][name] == expected["tokens"][name], where
                stats = seen["stats"][name]
                assert (stats["tp_rank"], stats["tp_size"], stats["num_pages"]) == (rank, 2, NUM_PAGES), where
                assert 2 * stats["peak_kv_bytes"] == expected["peak_kv_bytes"][name], where
            assert 2 * stats["pool_bytes"] == expected["pool_bytes"], family
            assert stats["pool_bytes"] == expected["local_pool_bytes"], family
            assert seen["prefix_cache"] == [expected["tokens"]["greedy"]] * 2, family
            assert seen["prefix_hits"] > 0, family
            # fp8 pages: a quarter of the fp32 pool; with the same scales, one process's tokens.
            assert 4 * seen["fp8_pool_bytes"] == stats["pool_bytes"], family
            assert seen["fp8"] == expected["fp8"], family
        # Each rank's scales are its own heads' (layer 0's K/V come from the embeddings alone:
        # the largest over the ranks is one process's over all heads).
        ranks = [report["families"][family]["fp8_scales"][0] for report in tp_run]
        assert ranks[0] != ranks[1], family
        assert [max(pair) for pair in zip(*ranks)] == pytest.approx(expected["fp8_scales"][0], rel=1e-6), family


@pytest.mark.slow
@pytest.mark.subprocess
def test_tp2_ranks_agree_on_pages_and_fail_together(tp_run):
    greedy = run_case(tiny_model("llama"), "greedy")
    rank0, rank1 = (report["agreement"] for report in tp_run)
    # Rank r's free memory was (r + 1) * 4 MiB with max_memory=0.5: both take rank 0's 2 MiB.
    config = tiny_model("llama").config
    head_dim = config.hidden_size // config.num_attention_heads
    page_bytes = config.num_hidden_layers * PAGE_SIZE * 2 * (config.num_key_value_heads // 2) * head_dim * 4
    assert rank0["budget_num_pages"] == rank1["budget_num_pages"] == 2**21 // page_bytes
    assert rank0["budget_tokens"] == rank1["budget_tokens"] == greedy
    # Rank 1 could not size its pool: it raised its error, rank 0 one naming it; neither wrapped.
    assert rank1["wrap_failure"]["error"] == "ValueError"
    assert rank0["wrap_failure"]["error"] == "TensorParallelError"
    assert "rank 1: ValueError: this rank's budget is below one page" in rank0["wrap_failure"]["message"]
    assert not rank0["wrapped_after_wrap_failure"] and not rank1["wrapped_after_wrap_failure"]
    # Rank 1 ran out of pages in a forward: both raised (no hang), every page returned, the next call works.
    assert rank1["forward_failure"]["error"] == "OutOfPagesError"
    assert rank0["forward_failure"]["error"] == "TensorParallelError"
    assert "rank 1: OutOfPagesError" in rank0["forward_failure"]["message"]
    for report in (rank0, rank1):
        assert report["pages_in_use_after_failure"] == 0
        assert report["tokens_after_failure"] == greedy


@pytest.mark.slow
@pytest.mark.subprocess
def test_tp2_kv_heads_not_divisible_is_a_clear_error_on_every_rank(tp_run):
    for report in tp_run:
        assert report["mqa"]["error"] == "UnsupportedModelError"
        assert "do not divide by tp_size=2" in report["mqa"]["message"]
        # One KV head: the only fix that applies is no tensor parallelism (no tp_size is offered).
        assert "load it without tensor parallelism" in report["mqa"]["message"]
        assert "load it with tp_size" not in report["mqa"]["message"]


def test_without_tensor_parallelism_nothing_changes():
    """A model loaded in one process has no TP group: the global heads, a pool as before."""
    model = tiny_model("llama")
    assert tp_group(model) is None
    hf_paged.wrap(model, num_pages=8, page_size=PAGE_SIZE)
    runtime = model.hf_paged_runtime
    assert runtime.tp is None
    assert local_specs(model, runtime.pool.specs, None) == runtime.pool.specs
    assert runtime.pool.specs[0].num_kv_heads == model.config.num_key_value_heads
    pool = make_pool(runtime.config, runtime.pool.specs, runtime.groups, None)
    assert pool.num_pages == 8
    stats = hf_paged.memory_stats(model)
    assert (stats["tp_rank"], stats["tp_size"]) == (0, 1)


class ThreadProcessGroup:
    """Ranks of a TP group as threads of this process: an all-reduce on (this, rank) waits for every
    rank's call, then each rank gets the reduction of all ranks' tensors."""

    def __init__(self, size: int):
        self.tensors: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)  # a rank that never arrives fails the test
        self.ops: list[object] = []  # rank 0's calls, in order

    def all_reduce(self, tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        shared, rank = group
        assert shared is self and not async_op
        self.tensors[rank] = tensor.clone()
        if rank == 0:
            self.ops.append(op)
        self.barrier.wait()  # every rank's tensor is in
        stacked = torch.stack(self.tensors)
        if op == torch.distributed.ReduceOp.MAX:
            reduced = stacked.amax(dim=0)
        elif op == torch.distributed.ReduceOp.MIN:
            reduced = stacked.amin(dim=0)
        else:
            assert op == torch.distributed.ReduceOp.SUM, op
            reduced = stacked.sum(dim=0)
        self.barrier.wait()  # every rank has read them: the next call may overwrite
        tensor.copy_(reduced)


def test_ranks_whose_budgets_differ_agree_on_the_smallest_pool(monkeypatch):
    """make_pool under TP with a stubbed process group (threads as ranks, no processes): each rank
    can afford another number of pages, every rank's pool gets the smallest, and no rank errs."""
    model = hf_paged.wrap(tiny_model("llama"), num_pages=8, page_size=PAGE_SIZE)
    runtime = model.hf_paged_runtime
    page_bytes = runtime.pool.page_bytes
    affordable = [40, 24, 32]  # pages each rank's budget holds
    group = ThreadProcessGroup(len(affordable))
    monkeypatch.setattr(torch.distributed, "all_reduce", group.all_reduce)

    def rank_pool(rank: int):
        budget = affordable[rank] * page_bytes + page_bytes // 2  # bytes: whole pages only
        config = runtime.config.with_overrides(num_pages=None, max_memory=budget)
        tp = TPGroup(rank=rank, size=len(affordable), group=(group, rank), device=torch.device("cpu"))
        return make_pool(config, runtime.pool.specs, runtime.groups, tp)

    pools = run_threads(rank_pool, len(affordable))
    assert [pool.num_pages for pool in pools] == [min(affordable)] * len(affordable)
    assert all(pool.blocks.num_free_pages == min(affordable) for pool in pools)
    assert all(layer.shape[1] == min(affordable) + 1 for pool in pools for layer in pool.pools)  # and the zero page
    assert len(group.ops) == 3  # sizing agreed ok, the pages agreed, allocating agreed ok
