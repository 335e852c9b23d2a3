"""output_attentions=True returns stock's attention weights (issue 30, point 3), fp32 CPU, against
eager stock: through a dense forward only when asked, the paged path unchanged otherwise."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.cache import steps
from test_any_mask import mixed_masks
from tiny import ALL_CONFIGS, fixed_length, generate, padded_prompts


def _eager(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ALL_CONFIGS[family](), attn_implementation="eager").eval()


# Llama; Gemma 2 (sliding layers of window 5, past which stock's cache holds only the window);
# GPT-2; Bloom (patched, ALiBi).
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bloom"])
@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
@pytest.mark.parametrize("masks", [padded_prompts, mixed_masks], ids=["left", "right_and_holes"])
def test_attention_weights_match_eager_stock(family, mode, masks):
    stock = _eager(family)
    paged = hf_paged.wrap(copy.deepcopy(stock), num_pages=256, page_size=4)
    input_ids, mask = masks()
    kwargs = dict(output_attentions=True, return_dict_in_generate=True, **fixed_length(4), **mode)
    expected, got = generate(stock, input_ids, mask, **kwargs), generate(paged, input_ids, mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.attentions) == len(expected.attentions)
    for step, (theirs, ours) in enumerate(zip(expected.attentions, got.attentions)):
        assert len(ours) == len(theirs), step
        for layer, (a, b) in enumerate(zip(theirs, ours)):
            assert b is not None and b.shape == a.shape, (step, layer)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {step} layer {layer}")


def test_without_output_attentions_no_forward_runs_dense(monkeypatch):
    calls = []
    original = steps.plan_dense
    monkeypatch.setattr(steps, "plan_dense", lambda *a, **k: calls.append(1) or original(*a, **k))
    paged = hf_paged.wrap(_eager("llama"), num_pages=256, page_size=4)
    input_ids, mask = padded_prompts()
    out = generate(paged, input_ids, mask, return_dict_in_generate=True, **fixed_length(4))
    assert out.attentions is None and not calls
    generate(paged, input_ids, mask, output_attentions=True, return_dict_in_generate=True, **fixed_length(4))
    assert len(calls) == 4  # every forward of that call
