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
    out = capsys.readouterr().out
    assert "stock sdpa vs eager agreement" in out and "logit error vs fp32 (mean abs)" in out
    # Both bf16 models' logits against the fp32 copy's, along its greedy path: rounding, of one size.
    error = summary["logit_error_vs_fp32"]
    assert 0 < error["paged"] < 1 and 0 < error["stock"] < 1
    assert error["ratio"] == error["paged"] / error["stock"] and 0.5 < error["ratio"] < 2
    assert 4 <= error["num_tokens"] <= 4 * 4  # 4 samples, up to 4 new tokens each (fewer after an EOS)
    assert 0.5 <= error["top1_paged"] <= 1 and 0.5 <= error["top1_stock"] <= 1 and "top-1 = fp32 (per step)" in out
    assert eval_main([*args, "--dtype", "float32", "--output-dir", str(tmp_path / "fp32")]) == 0
    fp32 = json.loads((tmp_path / "fp32" / "summary.json").read_text())
    assert "stock_attention_agreement" not in fp32 and "logit_error_vs_fp32" not in fp32


def test_first_line_exact_match_ignores_blank_lines_and_surrounding_spaces():
    from hf_paged.evaluation.metrics import score

    references = ["        if key is None:\n            lo = 0", "    return x"]
    predictions = ["\n        if key is None:  \n  something else", "    return y"]
    assert score(predictions, references, ["first_line"]) == {"first_line_exact": 50.0}


def test_logit_error_is_zero_for_the_fp32_model_itself_and_not_for_bf16():
    """The measure compares logits at the same inputs: the fp32 model forced along its own greedy path
    gives its own logits again (error 0); a bf16 copy of the same weights does not."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_paged.evaluation import default_model_path
    from hf_paged.evaluation.logit_error import fp32_paths, mean_abs_error
    from hf_paged.evaluation.runner import make_batches
    from hf_paged.evaluation.data import Sample

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    reference = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    prompts = ["def mean(values):\n    \"\"\"Return the mean.\"\"\"\n", "import os\n\ndef exists(path):\n"]
    samples = [Sample(i, str(i), prompt, None) for i, prompt in enumerate(prompts)]
    batches = make_batches(samples, tokenizer(prompts)["input_ids"], batch_size=2)
    device = torch.device("cpu")
    paths = fp32_paths(reference, batches, tokenizer.pad_token_id, device, max_new=6)
    same = mean_abs_error(copy.deepcopy(reference), reference, batches, paths, tokenizer.pad_token_id, device, 6)
    assert same == {"mean_abs": 0.0, "num_tokens": sum(len(path) for path in paths[0]), "top1": 1.0}
    half = mean_abs_error(copy.deepcopy(reference).to(torch.bfloat16), reference, batches, paths, tokenizer.pad_token_id, device, 6)
    assert half["mean_abs"] > 0 and half["num_tokens"] == same["num_tokens"] and 0.5 <= half["top1"] <= 1.0
