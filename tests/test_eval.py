"""scripts/eval.py end to end: outputs, data formats, --compare parity, bad input, accelerate, device maps.

Most tests call the script's main() in this process (fast); the exit-code and accelerate tests run
it as a subprocess, as a user would.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformers import AutoTokenizer

import hf_paged
from hf_paged.evaluation import default_model_path
from hf_paged.evaluation.data import BUNDLED_DATA, DEFAULT_TEMPLATE
from hf_paged.evaluation.model import pool_placement

from script_runs import CHECKOUT, EVAL_SCRIPT, SAMPLE_FIELDS, SUMMARY_FIELDS, eval_script, run_eval
from tiny import tiny_model

SCRIPT = EVAL_SCRIPT
SMALL_RUN = ["--limit", "4", "--batch-size", "2", "--max-new-tokens", "4", "--no-warmup"]


# The built-in model (4 layers, 2 KV heads of dim 64, fp32), by hand; hf_paged's default page size.
TOKEN_BYTES = 4 * 2 * 2 * 64 * 4  # layers x (K, V) x KV heads x head dim x 4 bytes = 4096
PAGE_SIZE = 16
CONTEXT = 512  # the built-in model's positions


def default_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def expected_kv_bytes(
    records: list[dict], batch_size: int, rows_per_sample: int, paged: bool, page_size: int = PAGE_SIZE
) -> int:
    """The KV bytes a run holds at its largest, from its outputs: generate() runs every row of a
    batch for as many steps as the batch's longest output, and the last step's token is never
    stored. Paged: each row's own tokens in whole pages; stock: every row padded to the batch's
    longest prompt."""
    peak = 0
    for number in sorted({record["batch"] for record in records}):
        batch = [record for record in records if record["batch"] == number]
        assert len(batch) <= batch_size
        steps = max(len(ids) for record in batch for ids in record["output_ids"])
        if paged:
            pages = sum(-(-(r["prompt_tokens"] + steps - 1) // page_size) for r in batch) * rows_per_sample
            held = pages * page_size * TOKEN_BYTES
        else:
            held = len(batch) * rows_per_sample * (max(r["prompt_tokens"] for r in batch) + steps - 1) * TOKEN_BYTES
        peak = max(peak, held)
    return peak


def bundled_rows() -> list[dict]:
    return [json.loads(line) for line in BUNDLED_DATA.read_text().splitlines()]


def test_default_run_writes_samples_and_summary(tmp_path):
    code, records, summary = run_eval(tmp_path, *SMALL_RUN, "--metric", "rouge,bleu,chrf")
    assert code == 0
    rows = bundled_rows()[:4]
    assert [record["id"] for record in records] == [row["id"] for row in rows]
    assert [record["reference"] for record in records] == [row["reference"] for row in rows]
    tokenizer = default_tokenizer()
    for record, row in zip(records, rows):
        assert SAMPLE_FIELDS <= set(record)
        assert record["prompt_tokens"] == len(tokenizer(row["prompt"])["input_ids"])  # template "{text}"
        assert 1 <= len(record["output_ids"][0]) <= 4
        assert record["output_text"] == tokenizer.decode(record["output_ids"][0], skip_special_tokens=True)
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["num_samples"] == 4
    assert summary["generated_tokens"] == sum(len(ids) for record in records for ids in record["output_ids"])
    assert summary["time_to_first_token_s"] <= summary["generate_seconds"]  # the first token is part of the call
    assert summary["paging"]["page_bytes"] == PAGE_SIZE * TOKEN_BYTES
    assert summary["peak_kv_bytes"] == expected_kv_bytes(records, batch_size=2, rows_per_sample=1, paged=True)
    assert set(summary["scores"]) == {"rouge1", "rouge2", "rougeL", "bleu", "chrf"}
    assert "stock" not in summary


@pytest.mark.parametrize(
    "mode",
    [
        [],
        ["--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.8"],
        ["--do-sample", "--temperature", "0.9", "--top-p", "0.95", "--num-return-sequences", "2"],
    ],
    ids=["greedy", "beams", "sampling"],
)
def test_compare_agrees_with_stock_on_cpu_fp32(tmp_path, mode):
    code, records, summary = run_eval(tmp_path, *SMALL_RUN, "--compare", "--page-size", "4", *mode)
    assert code == 0
    assert summary["agreement"] == 1.0
    assert all(record["match"] for record in records)
    assert [record["stock_output_ids"] for record in records] == [record["output_ids"] for record in records]
    assert set(summary["stock"]) <= set(summary)
    assert SUMMARY_FIELDS <= set(summary["stock"])
    assert summary["stock"]["num_samples"] == summary["num_samples"] == 4
    assert {"tokens_per_second", "time_to_first_token_s", "peak_kv_bytes"} <= set(summary["ratios"])
    if "--num-beams" in mode:
        assert summary["peak_shared_pages"] > 0  # beams share the prompt's pages (how many depends on the beams)
    else:  # both paths really ran, each holding what its cache must
        rows = 2 if "--num-return-sequences" in mode else 1
        assert summary["stock"]["peak_kv_bytes"] == expected_kv_bytes(records, 2, rows, paged=False)
        if rows == 1:
            assert summary["peak_kv_bytes"] == expected_kv_bytes(records, 2, rows, paged=True, page_size=4)


def _write_table(path: Path, rows: list[dict]) -> None:
    import datasets

    table = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        table.to_json(path, lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_data_files(tmp_path, suffix):
    rows = [
        {"key": f"row-{i}", "article": f"Story number {i} is about {word}.", "highlights": f"{word} story"}
        for i, word in enumerate(["boats", "trains", "bridges"])
    ]
    path = tmp_path / f"data{suffix}"
    _write_table(path, rows)
    code, records, summary = run_eval(
        tmp_path, "--data-files", str(path), "--text-column", "article", "--reference-column", "highlights",
        "--prompt-template", "[{key}] {text} TL;DR:", "--limit", "2", "--max-new-tokens", "2", "--no-warmup",
    )
    assert code == 0
    assert summary["num_samples"] == 2
    assert [record["reference"] for record in records] == ["boats story", "trains story"]
    tokenizer = default_tokenizer()
    expected = [len(tokenizer(f"[{row['key']}] {row['article']} TL;DR:")["input_ids"]) for row in rows[:2]]
    assert [record["prompt_tokens"] for record in records] == expected


def _long_file(tmp_path: Path) -> Path:
    path = tmp_path / "long.jsonl"
    rows = [{"document": "word " * 1200, "summary": "words"}, {"document": "short", "summary": "short"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


BAD_INPUT = {
    "missing column": (["--text-column", "article"], ["'article' is not a column", "'prompt'", "'reference'"]),
    "missing reference": (["--reference-column", "highlights"], ["'highlights' is not a column", "'prompt'"]),
    "empty slice": (["--split", "test[:0]"], ["selection is empty", "test[:0]"]),
    "empty file": ([], ["selection is empty"]),
    "unknown metric": (["--metric", "bleurt"], ["unknown --metric 'bleurt'", "rouge"]),
    "prompt too long": (["--max-new-tokens", "2"], [f"context of {CONTEXT}", "--truncate"]),
    "unknown hub dataset": (["--dataset", "hf-paged-tests/no-such-dataset"], ["could not load", "no-such-dataset"]),
    "pool too small": (["--limit", "2", "--num-pages", "2", "--page-size", "4"], ["out of pages", "needed"]),
    "bad max memory": (["--max-memory", "lots"], ["--max-memory 'lots'", "2GiB"]),
    "bad page size": (["--page-size", "0"], ["page_size", "got 0"]),
    "bad window page size": (["--window-page-size", "5"], ["--window-page-size", "divides page_size=16", "got 5"]),
    "backend cannot serve": (["--backend", "flashinfer", "--dtype", "float32"], ["'flashinfer' cannot serve", "fp32"]),
    "negative threads": (["--threads", "-1"], ["--threads must be >= 0", "-1"]),
    "negative seed": (["--seed", "-5"], ["--seed must be in", "-5"]),
    "zero temperature": (["--do-sample", "--temperature", "0"], ["--temperature must be > 0 with --do-sample"]),
    "bad top-p": (["--do-sample", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
    "unknown device": (["--device", "gpu0"], ["--device 'gpu0' is not a device"]),
    "missing folder": (["--model", "./nonexistent_dir"], ["--model ./nonexistent_dir", "nonexistent_dir does not exist"]),
}
if not torch.cuda.is_available():
    BAD_INPUT["cuda without cuda"] = (["--device", "cuda"], ["--device cuda: CUDA is not available", "--device cpu"])


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    args, messages = BAD_INPUT[case]
    if case == "empty file":
        (tmp_path / "empty.csv").write_text("document,summary\n")
        args = ["--data-files", str(tmp_path / "empty.csv")]
    if case == "prompt too long":
        args = [*args, "--data-files", str(_long_file(tmp_path))]
        num_tokens = len(default_tokenizer()(DEFAULT_TEMPLATE.format(text="word " * 1200))["input_ids"])
        messages = [*messages, f"has {num_tokens} tokens"]
    code = eval_script.main([*args, "--no-warmup", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    if case == "pool too small":  # found mid-run: the progress bar has started
        lines = [line for line in lines if "batch/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for message in messages:
        assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_truncate_keeps_the_last_tokens_that_fit(tmp_path):
    path = _long_file(tmp_path)
    code, records, _ = run_eval(
        tmp_path, "--data-files", str(path), "--max-new-tokens", "2", "--truncate", "--no-warmup"
    )
    assert code == 0
    short = len(default_tokenizer()(DEFAULT_TEMPLATE.format(text="short"))["input_ids"])
    assert [record["prompt_tokens"] for record in records] == [CONTEXT - 2, short]


@pytest.mark.subprocess
def test_bad_input_as_a_process_has_no_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **CHECKOUT}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--metric", "bleurt"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown --metric 'bleurt'" in result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_accelerate_two_processes_match_one_process(tmp_path):
    launcher = shutil.which("accelerate")
    assert launcher is not None, "accelerate's launcher is not on PATH; pip install accelerate"
    args = [str(SCRIPT), "--limit", "6", "--batch-size", "2", "--max-new-tokens", "4", "--no-warmup"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **CHECKOUT}
    one = subprocess.run(
        [sys.executable, *args, "--output-dir", str(tmp_path / "one")], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    # `accelerate launch --cpu` starts one process unless MPI is set up (`--mpirun_hostfile`); torchrun
    # (`--multi_gpu`) starts both, and the script joins them through gloo when it runs on CPU.
    two = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args, "--device", "cpu",
         "--output-dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    keys = ("id", "prompt_tokens", "output_text", "output_ids", "reference")

    def outputs(folder: str) -> list[tuple]:
        lines = (tmp_path / folder / "samples.jsonl").read_text().splitlines()
        return [tuple(json.dumps(json.loads(line)[key]) for key in keys) for line in lines]

    assert len(outputs("one")) == 6
    assert outputs("two") == outputs("one")
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary_one["num_processes"], summary_two["num_processes"]) == (1, 2)
    assert summary_two["num_samples"] == summary_one["num_samples"] == 6
    assert summary_two["generated_tokens"] == summary_one["generated_tokens"]
    assert summary_two["num_batches"] == summary_one["num_batches"] == 3


@pytest.mark.parametrize("source", ["checkpoint", "built-in"])
def test_explicit_device_map_places_each_pool_with_its_layer(tmp_path, source):
    """An explicit per-module map (all "cpu": the one device here), through from_pretrained, for the
    default model's folder named as a local checkpoint and for the built-in default."""
    model_args = ["--model", str(default_model_path())] if source == "checkpoint" else []
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    code, records, summary = run_eval(
        tmp_path, *model_args, "--device-map", json.dumps(device_map), "--compare", *SMALL_RUN
    )
    assert code == 0
    if source == "checkpoint":
        assert summary["model"] == model_args[1]
    assert summary["agreement"] == 1.0
    assert summary["pool_placement"] == [{"layer": i, "weights": "cpu", "pool": "cpu"} for i in range(4)]


def test_pool_placement_follows_layer_devices_meta():
    """Unit check of the placement logic with a second device kind (meta): proves each pool is
    allocated where that layer's attention weights live; it cannot run generate() on meta."""
    model = tiny_model("llama")
    model.model.layers[1].to("meta")
    hf_paged.wrap(model, num_pages=4, page_size=4)
    assert [pool.device.type for pool in model.hf_paged_runtime.pool.pools] == ["cpu", "meta"]
    assert pool_placement(model) == [
        {"layer": 0, "weights": "cpu", "pool": "cpu"},
        {"layer": 1, "weights": "meta", "pool": "meta"},
    ]


@pytest.mark.gpu
def test_device_map_across_cuda_and_cpu(tmp_path):
    """Layer 0 on the GPU, layer 1 on the CPU (accelerate hooks move activations): pools follow,
    and the split model still generates exactly the stock tokens."""
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, **{f"model.layers.{i}": "cpu" for i in range(1, 4)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    code, _, summary = run_eval(
        tmp_path, "--device-map", json.dumps(device_map), "--dtype", "float32", "--backend", "torch", "--compare",
        *SMALL_RUN,
    )
    assert code == 0
    assert summary["pool_placement"] == [{"layer": 0, "weights": "cuda:0", "pool": "cuda:0"}] + [
        {"layer": i, "weights": "cpu", "pool": "cpu"} for i in range(1, 4)
    ]
    assert summary["agreement"] == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5", 0.5), ("1.0", 1.0), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("4096", 4096), (None, None)],
)
def test_parse_memory(text, expected):
    assert eval_script.parse_memory(text) == expected


def test_dataset_by_name_config_and_split(tmp_path):
    """The --dataset path (name, config, sliced split) with a local dataset folder standing in for a hub
    repo: `datasets` resolves both the same way; this runs offline."""
    folder = tmp_path / "my_dataset"
    (folder / "shorts").mkdir(parents=True)
    rows = [{"id": f"t{i}", "document": f"Test document {i}.", "summary": f"doc {i}"} for i in range(5)]
    _write_table(folder / "shorts" / "test.jsonl", rows)
    _write_table(folder / "shorts" / "train.jsonl", rows[:1])
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: shorts\n  data_files:\n  - split: test\n    path: shorts/test.jsonl\n"
        "  - split: train\n    path: shorts/train.jsonl\n---\n"
    )
    code, records, summary = run_eval(
        tmp_path, "--dataset", str(folder), "--dataset-config", "shorts", "--split", "test[1:4]",
        "--max-new-tokens", "2", "--no-warmup",
    )
    assert code == 0
    assert [record["id"] for record in records] == ["t1", "t2", "t3"]
    assert summary["data"]["split"] == "test[1:4]"


def test_truncation_keeps_bos_and_the_prompt_tail():
    from hf_paged.evaluation.data import Sample
    from hf_paged.evaluation.runner import encode_prompts

    tokenizer = default_tokenizer()
    prompt = DEFAULT_TEMPLATE.format(text="a long document " * 12)
    full = tokenizer(prompt)["input_ids"]
    (ids,) = encode_prompts(tokenizer, [Sample(0, "0", prompt, None)], context=24, max_new_tokens=4, truncate=True)
    assert len(ids) == 20 < len(full)
    assert ids == [tokenizer.bos_token_id] + full[-19:]
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith(DEFAULT_TEMPLATE.split("{text}")[-1])


def test_agreement_counts_samples_whose_every_sequence_matches():
    from hf_paged.evaluation.report import agreement

    paged = [{"index": 0, "output_ids": [[5, 6], [7]]}, {"index": 1, "output_ids": [[5, 6], [7]]}]
    stock = [{"index": 1, "output_ids": [[5, 6], [8]]}, {"index": 0, "output_ids": [[5, 6], [7]]}]
    assert agreement(paged, stock) == 0.5
