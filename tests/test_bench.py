"""scripts/bench.py --quick: the JSON document has every field, with consistent types and ratios."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]  # runs scripts/bench.py as a user would

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench.py")
# The script imports the hf_paged of this checkout, not whichever one is installed.
CHECKOUT = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

SIDE_FIELDS = {"time_s": float, "times_s": list, "tokens_per_s": float, "ttft_s": float, "kv_bytes": int}
PAGED_FIELDS = {"page_size": int, "page_bytes": int, "pool_bytes": int, "peak_pages_in_use": int, "peak_shared_pages": int}
RATIO_FIELDS = ("time_s", "tokens_per_s", "ttft_s", "kv_bytes", "peak_mem_bytes")
WORKLOAD_FIELDS = {"name": str, "batch_size": int, "prompt_len": int, "new_tokens": int, "num_beams": int,
                   "do_sample": bool, "num_return_sequences": int}


def run_bench(tmp_path, *flags: str, output: dict | None = None) -> dict:
    """The JSON document of a --quick run; `output` receives its stdout and stderr."""
    path = tmp_path / "bench.json"
    command = [sys.executable, BENCH, "--quick", "--reps", "1", "--json", str(path), *flags]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **CHECKOUT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout or "+us/layer" in done.stdout, "the table was not printed"
    if output is not None:
        output.update(stdout=done.stdout, stderr=done.stderr)
    return json.loads(path.read_text())


# The --quick model (2 layers, 2 KV heads of dim 64 / 4 = 16, fp32) and page size 4, by hand:
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x 4 bytes = 512
PAGE_BYTES = 4 * TOKEN_BYTES  # 2048


def stock_kv_bytes(workload: dict) -> int:
    """A DynamicCache at its largest: every row (batch x beams or samples) holds the prompt and all
    new tokens but the last (the last forward writes its K/V before the last token is chosen)."""
    rows = workload["batch_size"] * max(workload["num_beams"], workload["num_return_sequences"])
    return rows * (workload["prompt_len"] + workload["new_tokens"] - 1) * TOKEN_BYTES


def check_result(result: dict, with_memory: bool) -> None:
    workload = result["workload"]
    for name, kind in WORKLOAD_FIELDS.items():
        assert isinstance(workload[name], kind), name
    assert (workload["prompt_len"], workload["new_tokens"]) == (24, 4)  # --quick
    assert result["tokens_match"] is True, f"{workload['name']}: paged tokens differ from stock"
    assert result["generated_tokens"] == workload["batch_size"] * workload["num_return_sequences"] * 4
    for side in ("stock", "paged"):
        row = result[side]
        for name, kind in SIDE_FIELDS.items():
            assert isinstance(row[name], kind), f"{side}.{name}: {row.get(name)!r}"
        assert len(row["times_s"]) == 1  # --reps 1
        if with_memory:
            assert isinstance(row["peak_mem_bytes"], int)
        else:
            assert row["peak_mem_bytes"] is None
    paged = result["paged"]
    for name, kind in PAGED_FIELDS.items():
        assert isinstance(paged[name], kind), f"paged.{name}"
    assert (paged["page_size"], paged["page_bytes"]) == (4, PAGE_BYTES)
    assert result["stock"]["kv_bytes"] == stock_kv_bytes(workload)
    # Paged: whole pages, and never more than a page per row beyond the unshared tokens.
    rows = workload["batch_size"] * max(workload["num_beams"], workload["num_return_sequences"])
    assert paged["kv_bytes"] % PAGE_BYTES == 0
    assert paged["kv_bytes"] <= stock_kv_bytes(workload) + rows * PAGE_BYTES
    assert set(result["ratios"]) == set(RATIO_FIELDS)
    assert result["ratios"]["peak_mem_bytes"] is None or with_memory


def test_json_schema_with_memory_and_plot(tmp_path):
    plot = tmp_path / "bench.png"
    document = run_bench(tmp_path, "--workload", "wide-beam", "--plot", str(plot), "--beams", "1,2")
    for key in ("machine", "model", "config", "elapsed_s", "results", "beam_sweep"):
        assert key in document, key
    for key in ("platform", "cpu_count", "torch", "transformers", "device", "load_avg"):
        assert key in document["machine"], key
    assert document["config"]["cascade"] is True
    [result] = document["results"]
    assert result["workload"]["name"] == "wide-beam"
    check_result(result, with_memory=True)
    assert isinstance(result["memory_method"], str)
    assert [p["workload"]["num_beams"] for p in document["beam_sweep"]] == [1, 2]
    for point in document["beam_sweep"]:
        check_result(point, with_memory=False)
    assert plot.stat().st_size > 1000, "no PNG written"


def test_every_workload_runs(tmp_path):
    output = {}
    document = run_bench(tmp_path, "--workload", "all", "--no-memory", output=output)
    names = [r["workload"]["name"] for r in document["results"]]
    assert names == ["summarize", "wide-beam", "multi-sample", "greedy", "ragged"]
    for result in document["results"]:
        check_result(result, with_memory=False)
        # The targets are for the full-size run: a smoke run shows none, and no "NO" that reads as a failure.
        assert result["targets"] is None and result["meets_targets"] is None
    assert "--quick" in document["targets_skipped"] and "--quick" in output["stdout"]
    assert " NO " not in output["stdout"] and "torch_dtype" not in output["stderr"]
    ragged = document["results"][-1]["workload"]
    assert ragged["min_prompt_len"] is not None and ragged["min_prompt_len"] < ragged["prompt_len"]
    assert document["beam_sweep"] == []


def test_targets_apply_only_to_the_default_full_size_run():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    assert bench.targets_skipped(bench.parse_args([])) is None
    assert bench.targets_skipped(bench.parse_args(["--threads", "0"])) is None  # a real run on more threads
    assert "--new-tokens" in bench.targets_skipped(bench.parse_args(["--new-tokens", "8"]))
    assert "--dtype" in bench.targets_skipped(bench.parse_args(["--dtype", "bfloat16"]))


def test_windowed_workloads_report_each_groups_pages(tmp_path):
    """--windowed: Gemma-3-style and Mistral-style models, stock's window-only cache against the
    groups, each group with its own page size (a smoke run: tokens and bytes, no targets)."""
    document = run_bench(tmp_path, "--workload", "none", "--windowed", "--no-memory")
    assert document["results"] == []
    runs = {r["workload"]: r for r in document["windowed"]}
    assert list(runs) == ["gemma3-greedy", "gemma3-beam4", "mistral-beam4"]
    for name, run in runs.items():
        assert run["tokens_match"] is True, name
        assert run["kv_target"] is None and run["meets_target"] is None  # --quick
        held = sum(g["peak_pages_in_use"] * g["page_bytes"] for g in run["groups"])
        assert run["paged_kv_bytes"] <= held and run["paged_kv_bytes"] < run["one_group_kv_bytes"], name
        # The pool peak (ids at one instant, inside forwards, at a whole id's bytes) bounds what rows held after forwards.
        assert run["paged_kv_bytes"] <= run["paged_pool_bytes"], name
    full, sliding = runs["gemma3-greedy"]["groups"]
    # --quick: windows 16 and 32 (crossed by its prompts of 48), pages of 4, sliding pages of 1.
    assert (full["window"], full["page_size"], sliding["window"], sliding["page_size"]) == (None, 4, 16, 1)
    [mistral] = runs["mistral-beam4"]["groups"]
    assert (mistral["window"], mistral["page_size"]) == (32, 1)


def test_overhead_workload_reports_each_executor(tmp_path):
    """--workload overhead: the compute-free model's step times for stock, the torch executor and
    the FlashInfer executor's host side (its no-kernel stand-in); the torch executor's tokens are
    stock's. (Numbers only: no timing is asserted.)"""
    output = {}
    document = run_bench(tmp_path, "--workload", "overhead", output=output)
    assert document["results"] == []
    overhead = document["overhead"]
    assert overhead["model"]["layers"] == 2 and overhead["new_tokens"] == 8  # --quick
    cases = {r["case"]: r for r in overhead["results"]}
    assert list(cases) == ["greedy, batch 1", "sample, batch 4 x 2 seqs"]
    sample = cases["sample, batch 4 x 2 seqs"]
    assert (sample["batch_size"], sample["do_sample"], sample["num_return_sequences"]) == (4, True, 2)
    for name, result in cases.items():
        assert result["tokens_match"] is True, name
        assert set(result["step_ms"]) == {"stock", "torch", "flashinfer-host"}
        assert all(isinstance(ms, float) and ms > 0 for ms in result["step_ms"].values()), name
        assert set(result["added_us_per_layer_token"]) == {"torch", "flashinfer-host"}
        # 8 new tokens: 6 intervals between the 7 decode forwards, per run (warm-up excluded)
        assert result["num_steps"] == {"stock": 6, "torch": 6, "flashinfer-host": 6}
    assert "+us/layer" in output["stdout"]
