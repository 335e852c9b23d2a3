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


def run_bench(tmp_path, *flags: str) -> dict:
    path = tmp_path / "bench.json"
    command = [sys.executable, BENCH, "--quick", "--reps", "1", "--json", str(path), *flags]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout, "the table was not printed"
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
    document = run_bench(tmp_path, "--workload", "all", "--no-memory")
    names = [r["workload"]["name"] for r in document["results"]]
    assert names == ["summarize", "wide-beam", "multi-sample", "greedy", "ragged"]
    for result in document["results"]:
        check_result(result, with_memory=False)
        assert result["targets"] is not None
    ragged = document["results"][-1]["workload"]
    assert ragged["min_prompt_len"] is not None and ragged["min_prompt_len"] < ragged["prompt_len"]
    assert document["beam_sweep"] == []
