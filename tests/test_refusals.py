"""wrap() refuses, from the model's structure and before touching it, what would give other tokens."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged import UnsupportedModelError

from tiny import padded_prompts

spec = importlib.util.spec_from_file_location("support_matrix", Path(__file__).parent.parent / "scripts" / "support_matrix.py")
matrix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix)


def tiny(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = matrix.tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("bert", "bidirectional"),  # is_decoder=False: its prompt attends both ways
        ("diffllama", "differential attention"),
        ("flint", "attention sinks"),
        ("jetmoe", "attention experts"),
        ("doge", "dynamic attention mask"),
        ("mimo_v2_flash", "head size|sinks"),  # both apply; the sinks check (wrap.py) runs first
        ("mllama", "cross-attention"),
    ],
)
def test_structures_that_would_give_other_tokens_are_refused_before_the_model_is_touched(model_type, reason):
    model = tiny(model_type)
    implementation = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=reason):
        hf_paged.wrap(model, num_pages=64, page_size=4)
    assert model.config._attn_implementation == implementation and not hasattr(model, "hf_paged_runtime")
    assert not any("forward" in module.__dict__ for module in model.modules())


def generate_all(model) -> list[torch.Tensor]:
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 4))
    out = []
    for mode in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)):
        torch.manual_seed(5)
        out.append(model.generate(input_ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **mode))
    return out


@pytest.mark.parametrize("model_type, overrides", [("bert", dict(is_decoder=True)), ("gpt_bigcode", dict())])
def test_a_causal_bert_and_multi_query_bigcode_are_served(model_type, overrides):
    model = tiny(model_type, **overrides)
    expected = generate_all(model)
    hf_paged.wrap(model, num_pages=256, page_size=4)
    for got, tokens in zip(generate_all(model), expected):
        assert torch.equal(got, tokens)
