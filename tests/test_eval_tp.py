"""scripts/eval.py with tensor parallelism: `torchrun --nproc_per_node 2 scripts/eval.py --tp 2` (two
gloo processes on CPU) runs on the built-in model as the README writes it and gives the
single-process outputs; summary.json records the TP size and each rank's pool; a model whose KV
heads do not divide by --tp is refused before loading, naming the fixes that apply."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from hf_paged.evaluation import EvalError
from hf_paged.evaluation.model import check_tp_heads

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "eval.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
RUN = ["--limit", "6", "--batch-size", "3", "--max-new-tokens", "6", "--num-beams", "2", "--num-pages", "256",
       "--no-warmup"]
README_COMMAND = "torchrun --nproc_per_node 2 scripts/eval.py --tp 2"


def _launcher() -> str:
    return shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def _outputs(folder: Path) -> list[list]:
    keys = ("index", "id", "prompt_tokens", "output_text", "output_texts", "output_ids", "reference")
    return [[sample[key] for key in keys] for sample in _samples(folder)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_readme_tp_command_runs_on_the_built_in_model(tmp_path):
    """Issue 34 point 9: the README's command, exactly (plus --output-dir), on the default model."""
    for page in ("README.md", "docs/evaluation.md"):  # README's table of several GPUs; the docs' command list
        text = (ROOT / page).read_text()
        assert re.search(rf"{re.escape(README_COMMAND)}( \.\.\.`|`|\s*#|$)", text, re.MULTILINE), f"{page} lost the command"
    one = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    _, *command = README_COMMAND.split()  # torchrun's arguments, run from the checkout's root
    # --standalone: a free rendezvous port, so parallel runs on one machine do not collide.
    two = subprocess.run([_launcher(), "--standalone", *command, "--output-dir", str(tmp_path / "tp")],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "rougeL" in two.stdout and "first_line_exact" in two.stdout
    assert _outputs(tmp_path / "tp") == _outputs(tmp_path / "one")
    summary = json.loads((tmp_path / "tp" / "summary.json").read_text())
    assert summary["model"] == "builtin:stdlib-code-llama" and summary["num_samples"] == 40
    assert summary["tensor_parallel"]["tp_size"] == 2
    assert [rank["tp_rank"] for rank in summary["tensor_parallel"]["ranks"]] == [0, 1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_tp2_writes_the_single_process_outputs(tmp_path):
    one = subprocess.run(
        [sys.executable, str(SCRIPT), *RUN, "--output-dir", str(tmp_path / "one")], capture_output=True, text=True,
        env=ENV, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [_launcher(), "--standalone", "--nproc_per_node", "2", str(SCRIPT), *RUN, "--tp", "2", "--compare",
         "--output-dir", str(tmp_path / "tp")],
        capture_output=True, text=True, env=ENV, timeout=400,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    single, sharded = _samples(tmp_path / "one"), _samples(tmp_path / "tp")
    assert len(single) == 6
    assert _outputs(tmp_path / "tp") == _outputs(tmp_path / "one")
    assert all(sample["match"] for sample in sharded)  # --compare: the unwrapped TP model gives them too
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    summary = json.loads((tmp_path / "tp" / "summary.json").read_text())
    assert summary["agreement"] == 1.0
    assert (summary["num_samples"], summary["num_batches"]) == (6, 2)
    assert summary["generated_tokens"] == summary_one["generated_tokens"]
    assert summary["tensor_parallel"]["tp_size"] == 2 and summary["num_processes"] == 2
    ranks = summary["tensor_parallel"]["ranks"]
    (single_pool,) = summary_one["tensor_parallel"]["ranks"]
    assert [rank["tp_rank"] for rank in ranks] == [0, 1]
    for rank in ranks:  # each rank's pool: the same pages, half the KV heads
        assert rank["num_pages"] == single_pool["num_pages"] == 256
        assert 2 * rank["pool_bytes"] == single_pool["pool_bytes"]
        assert 2 * rank["peak_kv_bytes"] == single_pool["peak_kv_bytes"] == summary_one["peak_kv_bytes"]


@pytest.mark.subprocess
def test_eval_tp_needs_as_many_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tp", "2", "--limit", "2", "--no-warmup"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert result.returncode == 2
    assert "--tp 2 shards the model over 2 processes, but 1 were launched: use torchrun --nproc_per_node 2" in result.stderr


def _config_folder(folder: Path, kv_heads: int) -> str:
    transformers.LlamaConfig(hidden_size=384, num_attention_heads=6, num_key_value_heads=kv_heads).save_pretrained(folder)
    return str(folder)


def test_kv_heads_that_do_not_divide_by_tp_name_the_fixes_that_apply(tmp_path):
    with pytest.raises(EvalError) as one_head:
        check_tp_heads(_config_folder(tmp_path / "mqa", 1), "mqa", 2)
    message = str(one_head.value)
    assert "--tp 2: mqa has 1 KV head per layer, which does not divide by 2" in message
    assert "use data parallelism for 2 processes: accelerate launch --num_processes 2 scripts/eval.py" in message
    with pytest.raises(EvalError) as six_heads:
        check_tp_heads(_config_folder(tmp_path / "six", 6), "six", 4)
    assert "use --tp 2 or 3 or 6 (with as many processes), or data parallelism for 4 processes" in str(six_heads.value)
    check_tp_heads(_config_folder(tmp_path / "two", 2), "two", 2)  # divides: no error
