"""What the tensor-parallel test runs, shared by the test (single process, stock) and
tests/tp_worker.py (two gloo processes under torchrun, TP 2)."""

import torch

from tiny import padded_prompts

# Llama (GQA: 4 query heads, 2 KV heads), Qwen2 (a sliding first layer, then full), Gemma 2
# (alternating sliding and full layers, soft-capping): each rank of TP 2 holds one KV head.
FAMILIES = ("llama", "qwen2", "gemma2")
NUM_PAGES = 96  # a fixed pool, so the single-process and the per-rank pools compare
PAGE_SIZE = 4

# Ragged left padding; 12 new tokens take every row past the sliding windows (5 and 6).
PROMPT = dict(batch=3, length=9, pads=(0, 3, 6), seed=3)

# fp8 pages: given scales (every rank the same; the tiny models' |K|, |V| stay below 448 x these).
FP8_SCALES = (0.02, 0.015)

CASES = {
    "greedy": dict(max_new_tokens=12, do_sample=False),
    "beams": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False),
    # Stock TP needs the same seed on every rank (each rank samples from the gathered logits).
    "sample": dict(max_new_tokens=10, do_sample=True, top_k=0, top_p=1.0, num_return_sequences=2, seed=7),
}


def run_case(model: torch.nn.Module, name: str) -> list[list[int]]:
    """generate() of case `name` on the prompt; the token ids of every returned row."""
    input_ids, mask = padded_prompts(**PROMPT)
    settings = dict(CASES[name])
    seed = settings.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids, attention_mask=mask, pad_token_id=0, **settings)
    return out.tolist()
