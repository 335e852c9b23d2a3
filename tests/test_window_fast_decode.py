"""The windowed fast decode path, end to end: greedy on equal-length, unpadded prompts longer than
the window, so every decode step of a sliding group reads its rows' K/V as one strided view and
leaves the keys before the window out of the read (attention/torch/dense.py: `trim`), a plan carried
over from step to step (`advance_plan`) while the rows stay on the same pages.

Padded prompt sets (every other windowed end-to-end test) give rows of unequal lengths, which the
masked path reads instead; so does a sliding page of 1 (a new page every step: a new plan). Hence
sliding pages of 4 here, and a Gemma-2 shape without the attention soft cap (a capped layer is
read through the masked path).
"""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.attention.torch import TorchExecutor

import tiny
from tiny import COMMON, SMALL, fixed_length

WINDOW = 5
CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=WINDOW, **COMMON),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=None, final_logit_softcapping=3.0, **COMMON
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 3}, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], **COMMON,
    ),
}


class TrimCounter(TorchExecutor):
    """The torch executor, counting the decode plans it carried over that leave keys out of the read."""

    def __init__(self):
        self.num_trimmed = 0

    def advance_plan(self, plan, meta):
        advanced = super().advance_plan(plan, meta)
        if advanced is not None and advanced.trim > 0:
            self.num_trimmed += 1
        return advanced


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_on_equal_length_prompts_past_the_window_trims_and_matches_stock(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    input_ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))  # no padding
    expected = tiny.generate(model, input_ids, None, **fixed_length(10))
    hf_paged.wrap(model, num_pages=64, page_size=4, window_page_size=4)
    counter = model.hf_paged_runtime.executor = TrimCounter()
    assert torch.equal(tiny.generate(model, input_ids, None, **fixed_length(10)), expected)
    assert any(group.window == WINDOW for group in model.hf_paged_runtime.groups)
    # 9 decode steps (positions 12..20): those at 12, 16 and 20 take a page and let one go (a new
    # plan); at least the six others carry the step before's plan over, trimmed.
    assert counter.num_trimmed >= 6, counter.num_trimmed
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
