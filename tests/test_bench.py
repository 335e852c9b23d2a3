"""scripts/bench.py --quick: the JSON document has every field, with consistent types and ratios."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench.py")

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
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout, "the table was not printed"
    if output is not None:
        output.update(stdout=done.stdout, stderr=done.stderr)
    return json.loads(path.read_text())


def check_result(result: dict, with_memory: bool) -> None:
    for name, kind in WORKLOAD_FIELDS.items():
        assert isinstance(result["workload"][name], kind), name
    assert isinstance(result["tokens_match"], bool)
    assert result["tokens_match"], f"{result['workload']['name']}: paged tokens differ from stock"
    assert result["generated_tokens"] == (
        result["workload"]["batch_size"] * result["workload"]["num_return_sequences"] * result["workload"]["new_tokens"]
    )
    for side in ("stock", "paged"):
        row = result[side]
        for name, kind in SIDE_FIELDS.items():
            assert isinstance(row[name], kind), f"{side}.{name}: {row.get(name)!r}"
        assert row["time_s"] > 0 and row["ttft_s"] > 0 and row["kv_bytes"] > 0
        assert row["time_s"] == pytest.approx(sorted(row["times_s"])[len(row["times_s"]) // 2])
        assert row["tokens_per_s"] == pytest.approx(result["generated_tokens"] / row["time_s"])
        if with_memory:
            assert isinstance(row["peak_mem_bytes"], int) and row["peak_mem_bytes"] >= 0
        else:
            assert row["peak_mem_bytes"] is None
    paged = result["paged"]
    for name, kind in PAGED_FIELDS.items():
        assert isinstance(paged[name], kind), f"paged.{name}"
    assert paged["kv_bytes"] == paged["peak_pages_in_use"] * paged["page_bytes"]
    assert set(result["ratios"]) == set(RATIO_FIELDS)
    for name in RATIO_FIELDS:
        stock_value, paged_value = result["stock"][name], result["paged"][name]
        if paged_value is None or not stock_value:
            assert result["ratios"][name] is None, name
        else:
            assert math.isclose(result["ratios"][name], paged_value / stock_value, rel_tol=1e-9), name
    if result["targets"] is not None:
        expected = (result["tokens_match"] and result["ratios"]["time_s"] <= result["targets"]["time_s"]
                    and result["ratios"]["kv_bytes"] <= result["targets"]["kv_bytes"])
        assert result["meets_targets"] == expected


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
