"""scripts/eval.py with tensor parallelism: `torchrun --nproc_per_node 2 scripts/eval.py --tp 2 ...`
(two gloo processes on CPU) writes the single-process outputs; summary.json records the TP size and
each rank's pool."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hf_paged.evaluation.default_model import byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "eval.py"
RUN = ["--limit", "6", "--batch-size", "3", "--max-new-tokens", "6", "--num-beams", "2", "--num-pages", "256",
       "--no-warmup"]


def _save_model(folder: Path) -> None:
    """A tiny random Llama with 2 KV heads (one per rank) and the built-in byte tokenizer."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_tp2_writes_the_single_process_outputs(tmp_path):
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    _save_model(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    args = [str(SCRIPT), "--model", str(tmp_path / "model"), *RUN]
    one = subprocess.run(
        [sys.executable, *args, "--output-dir", str(tmp_path / "one")], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    # docs/multi-gpu.md's command, with a local model folder for the hub name.
    two = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", "2", *args, "--tp", "2", "--compare",
         "--output-dir", str(tmp_path / "tp")],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    keys = ("index", "id", "prompt_tokens", "output_text", "output_texts", "output_ids", "reference")
    single, sharded = _samples(tmp_path / "one"), _samples(tmp_path / "tp")
    assert len(single) == 6
    assert [[s[k] for k in keys] for s in sharded] == [[s[k] for k in keys] for s in single]
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
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert result.returncode == 2
    assert "--tp 2 shards the model over 2 processes, but 1 were launched: use torchrun --nproc_per_node 2" in result.stderr
