"""One rank of tests/test_gpu_tp.py: `torchrun --nproc_per_node 2 tests/tp_gpu_worker.py MODEL OUT BACKEND DTYPE`.

Loads the saved model with transformers' TP 2 (NCCL on two GPUs; gloo on CPU for a dry run of the
plumbing), runs greedy and beam search stock and wrapped on BACKEND, and writes to OUT/rank{rank}.json
the tokens, their agreement with stock (tests/numerics.py's token_agreement, as tests/test_gpu.py judges)
and what this rank's pool holds.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_paged  # noqa: E402
from numerics import GPU_NEW_TOKENS as NEW_TOKENS, gpu_prompts, token_agreement  # noqa: E402


def main() -> None:
    model_dir, out, backend, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, distributed_config=DistributedConfig(tp_size=2)
    ).eval()
    device = model.get_input_embeddings().weight.device
    input_ids, mask = gpu_prompts(device)  # tests/test_gpu.py's prompts, on this rank's device
    report = {"rank": dist.get_rank(), "modes": {}}
    for mode, num_beams in (("greedy", 1), ("beam", 4)):
        kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                      do_sample=False, num_beams=num_beams)
        stock = model.generate(input_ids, **kwargs)
        hf_paged.wrap(model, num_pages=256, page_size=16, backend=backend)
        runtime = model.hf_paged_runtime
        paged = model.generate(input_ids, **kwargs)
        stats = hf_paged.memory_stats(model)
        report["modes"][mode] = {
            "executor": runtime.executor.name,
            "local_kv_heads": [spec.num_kv_heads for spec in runtime.pool.specs],
            "stats": {key: value for key, value in stats.items() if key != "groups"},
            "paged": paged.tolist(),
        }
        hf_paged.unwrap(model)
        report["modes"][mode]["agreement"] = token_agreement(
            stock, paged, model, mask, input_ids.shape[1], beams=num_beams > 1
        )
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
