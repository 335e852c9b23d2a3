"""scripts/eval.py's figures say what they are (issue 20): the built-in data's split, score units."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hf_paged.evaluation.report import table

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval.py"


@pytest.fixture
def eval_main():
    spec = importlib.util.spec_from_file_location("hf_paged_eval_script_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module.main
    torch.set_num_threads(threads)


def test_the_built_in_data_takes_the_test_split_that_help_names(tmp_path, eval_main):
    args = ["--batch-size", "2", "--max-new-tokens", "2", "--no-warmup", "--output-dir", str(tmp_path)]
    assert eval_main(["--split", "test[:3]", *args]) == 0
    records = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(records) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["data"]["split"] == "test[:3]"
    assert eval_main(["--split", "train[:3]", *args]) == 2  # the built-in data has no train split


def test_the_table_says_the_unit_of_each_score():
    summary = {
        "num_samples": 1, "generated_tokens": 2, "tokens_per_second": 1.0, "time_to_first_token_s": 0.1,
        "peak_kv_bytes": 10, "peak_shared_pages": 0,
        "scores": {"rouge1": 0.8167, "rouge2": 0.0, "rougeL": 0.5, "bleu": 1.0, "chrf": 2.0},
    }
    lines = table(summary).splitlines()
    titles = [line.split("  ")[0] for line in lines]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert f"{name} (F1, 0-100)" in titles
    assert "bleu (0-100)" in titles and "chrf (0-100)" in titles


def test_compare_in_half_precision_puts_stock_attention_agreement_next_to_hf_paged(tmp_path, eval_main, capsys):
    args = ["--limit", "4", "--batch-size", "2", "--max-new-tokens", "4", "--no-warmup", "--compare"]
    assert eval_main([*args, "--dtype", "bfloat16", "--output-dir", str(tmp_path / "bf16")]) == 0
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    other = summary["stock_attention_agreement"]
    assert other["implementations"] == ["sdpa", "eager"] and 0.0 <= other["agreement"] <= 1.0
    assert "stock sdpa vs eager agreement" in capsys.readouterr().out
    assert eval_main([*args, "--dtype", "float32", "--output-dir", str(tmp_path / "fp32")]) == 0
    assert "stock_attention_agreement" not in json.loads((tmp_path / "fp32" / "summary.json").read_text())
