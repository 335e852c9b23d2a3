"""PEFT's merge_and_unload() / unload() after wrap(peft_model) return a cleanly wrapped model (issue 34):
its generate() is paged and gives stock's tokens, unwrap() restores it, wrap() again works."""

import copy
import gc

import pytest
import torch

import hf_paged
from hf_paged.cache.runtime import RUNTIME_ATTR

from tiny import fixed_length, padded_prompts, tiny_model

peft = pytest.importorskip("peft")  # in the test extra; skipped only outside it


def lora_model():
    """The tiny llama with a LoRA adapter on its Q and V projections, initialised away from zero."""
    torch.manual_seed(100)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(tiny_model("llama"), config).eval()


def generate(model, **kwargs):
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    torch.manual_seed(7)
    return model.generate(input_ids, attention_mask=mask, pad_token_id=0, **fixed_length(6), **kwargs)


def assert_unwrapped(model) -> None:
    """Nothing of wrap() is left: the attention implementation, hooks, runtime attributes, generate."""
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, RUNTIME_ATTR) and "generate" not in vars(model)
    assert len(model.model._forward_pre_hooks) == 0 and len(model.model._forward_hooks) == 0
    assert not any(hasattr(module, RUNTIME_ATTR) for module in model.modules())


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_the_model_peft_returns_is_wrapped_and_unwraps_cleanly(how):
    peft_model = lora_model()
    expected = {mode: generate(getattr(copy.deepcopy(peft_model), how)(), **kw)
                for mode, kw in (("greedy", {}), ("beam", dict(num_beams=3)))}
    hf_paged.wrap(peft_model, num_pages=64, page_size=4)
    generate(peft_model)
    base = getattr(peft_model, how)()
    # Wrapped like any wrapped model: paged generate() (its peak counts pages), stock's tokens.
    assert base.config._attn_implementation == "hf_paged"
    assert hf_paged.memory_stats(base)["num_pages"] == 64
    for mode, kw in (("greedy", {}), ("beam", dict(num_beams=3))):
        assert torch.equal(generate(base, **kw), expected[mode]), mode
        assert hf_paged.memory_stats(base)["peak_pages_in_use"] > 0
    hf_paged.unwrap(base)
    assert_unwrapped(base)
    assert torch.equal(generate(base), expected["greedy"])
    hf_paged.wrap(base, num_pages=32, page_size=4)  # and again, with other settings
    assert torch.equal(generate(base, num_beams=3), expected["beam"])
    assert hf_paged.memory_stats(base)["num_pages"] == 32 and hf_paged.memory_stats(base)["pages_in_use"] == 0


def test_unwrapping_the_peft_model_unwraps_the_model_it_wraps():
    peft_model = lora_model()
    expected = generate(peft_model)
    hf_paged.wrap(peft_model, num_pages=64, page_size=4)
    inner = peft_model.get_base_model()
    assert hf_paged.memory_stats(inner)["num_pages"] == 64  # one runtime, one pool
    hf_paged.unwrap(peft_model)
    assert_unwrapped(inner)
    assert not hasattr(peft_model, RUNTIME_ATTR) and "generate" not in vars(peft_model)
    assert torch.equal(generate(peft_model), expected)
    hf_paged.wrap(peft_model, num_pages=16, page_size=4)
    assert torch.equal(generate(peft_model), expected)
    hf_paged.wrap(peft_model, num_pages=32, page_size=4)  # re-wrapped with other settings
    assert hf_paged.memory_stats(peft_model.merge_and_unload())["num_pages"] == 32


def test_the_merged_model_stays_wrapped_after_the_peft_model_is_gone():
    """wrap() links its runtime to both models weakly: once the PEFT model is freed, the merged model
    it returned is the runtime's model (a returned cache copies onto it; a changed attention
    implementation on it is followed)."""
    peft_model = lora_model()
    expected = generate(copy.deepcopy(peft_model).merge_and_unload(), num_beams=3)
    hf_paged.wrap(peft_model, num_pages=64, page_size=4)
    base = peft_model.merge_and_unload()
    del peft_model
    gc.collect()
    assert torch.equal(generate(base, num_beams=3), expected)
    input_ids, mask = padded_prompts()
    out = base.generate(input_ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, return_dict_in_generate=True)
    copy.deepcopy(out.past_key_values).release()  # PagedCache copies onto the runtime's model
    out.past_key_values.release()
    base.config._attn_implementation = "eager"
    assert torch.equal(generate(base, num_beams=3), expected)
    assert base.hf_paged_runtime.original_attn_implementation == "eager"
    assert hf_paged.memory_stats(base)["pages_in_use"] == 0
