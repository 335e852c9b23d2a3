"""FlashInfer under tensor parallelism: two GPUs, transformers' TP 2 (NCCL), one torchrun launch of
tests/tp_gpu_worker.py. Each rank plans FlashInfer on its local heads (one KV head of the model's
two); greedy and beam search agree with the unwrapped TP model as tests/test_gpu.py's single-GPU
tests do (numerics.token_agreement), and both ranks return the same tokens. Skipped without two GPUs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (tensor parallelism over 2 ranks)"),
]


def run_worker(tmp_path: Path, backend: str, dtype: str) -> list[dict]:
    """Save the model of tests/test_gpu.py's generate tests, launch both ranks, return their reports."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    (tmp_path / "out").mkdir()
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", "2", str(TESTS / "tp_gpu_worker.py"),
         str(tmp_path / "model"), str(tmp_path / "out"), backend, dtype],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_flashinfer_under_tp2_plans_local_heads_and_agrees_with_stock(tmp_path):
    pytest.importorskip("flashinfer")
    reports = run_worker(tmp_path, "flashinfer", "bfloat16")
    for mode in ("greedy", "beam"):
        seen = [report["modes"][mode] for report in reports]
        assert seen[0]["paged"] == seen[1]["paged"], f"{mode}: the ranks returned different tokens"
        for rank, entry in enumerate(seen):
            assert entry["executor"] == "flashinfer"
            assert entry["local_kv_heads"] == [1, 1]  # two KV heads over two ranks
            assert (entry["stats"]["tp_rank"], entry["stats"]["tp_size"]) == (rank, 2)
            assert entry["stats"]["pages_in_use"] == 0
            assert entry["agreement"] >= 0.99, f"{mode}, rank {rank}: {entry['agreement']:.3f} of tokens agree"
