"""hf_paged.patches: families whose attention bypasses the attention interface, token for token.

Each family runs greedy, sampling with num_return_sequences and beam search on left-padded prompts
of unequal length, wrapped and unwrapped (fp32, CPU), and must give the same tokens.
"""

import copy
import importlib.util

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged import _compat, patches

from tiny import (
    FALCON, MODES, PATCHED_CONFIGS, fixed_length, generate, padded_prompts, routes_through_interface, tiny_model,
    with_eos_mid_sequence,
)


def assert_same_tokens(model: torch.nn.Module, length: int = 13, pads: tuple[int, ...] = (0, 5), new: int = 10):
    input_ids, mask = padded_prompts(batch=2, length=length, pads=pads)
    # use_cache=True: MPT's config turns the cache off by default.
    kwargs = {mode: dict(seed=7, use_cache=True, **fixed_length(new), **extra) for mode, extra in MODES.items()}
    expected = {mode: generate(model, input_ids, mask, **kw) for mode, kw in kwargs.items()}
    hf_paged.wrap(model, num_pages=512, page_size=4)
    # Falcon routes through the interface from 5.25 (GPT-J and CodeGen from 5.24): no patch there.
    assert (model.hf_paged_runtime.patch is None) == routes_through_interface(model.config.model_type)
    for mode, kw in kwargs.items():
        assert torch.equal(generate(model, input_ids, mask, **kw), expected[mode]), mode
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


@pytest.mark.parametrize("family", sorted(PATCHED_CONFIGS))
def test_patched_family_gives_stock_tokens(family):
    assert_same_tokens(tiny_model(family))


@pytest.mark.parametrize("family", ["bloom", "falcon", "gpt_neo", "mpt", "xglm"])
def test_eos_mid_sequence_in_every_mode_gives_stock_tokens(family):
    """Rows that finish early (EOS at new token 3 of row 0 under greedy), then pads: GPT-Neo's local
    layers (window 5) see the EOS rows past their window."""
    model, input_ids, mask = with_eos_mid_sequence(family, batch=3, pads=(0, 4, 7))
    kwargs = {mode: dict(seed=7, use_cache=True, max_new_tokens=10, **extra) for mode, extra in MODES.items()}
    expected = {mode: generate(model, input_ids, mask, **kw) for mode, kw in kwargs.items()}
    assert (expected["greedy"][0, 13:] == model.generation_config.eos_token_id).any(), "the case must exercise an EOS"
    hf_paged.wrap(model, num_pages=512, page_size=4)
    for mode, kw in kwargs.items():
        assert torch.equal(generate(model, input_ids, mask, **kw), expected[mode]), mode
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_a_model_whose_generation_config_turns_the_cache_off_generates_as_stock():
    """MPT's config has use_cache=False: stock generate() re-feeds the whole sequence with no cache;
    the wrapped generate() must do the same rather than hand it a PagedCache."""
    model = tiny_model("mpt_clip_qkv_6_heads")
    assert model.generation_config.use_cache is False
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 5))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=512, page_size=4)
    assert torch.equal(model.generate(input_ids, **kwargs), expected)
    assert hf_paged.memory_stats(model)["peak_pages_in_use"] == 0  # no PagedCache was used


def test_unwrap_restores_the_class_forward_bit_for_bit():
    model = tiny_model("gpt_neo")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 3))
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
    hf_paged.wrap(model, num_pages=64, page_size=4)
    attention = model.hf_paged_runtime.attention_modules
    assert all("forward" in module.__dict__ for module in attention)
    with torch.no_grad():  # a forward without a PagedCache runs the stock forward
        torch.testing.assert_close(model(input_ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    hf_paged.unwrap(model)
    assert all("forward" not in module.__dict__ for module in attention)
    assert all(module.forward.__func__ is type(module).forward for module in attention)
    assert not any(hasattr(module, "hf_paged_runtime") for module in attention)
    with torch.no_grad():
        assert torch.equal(model(input_ids, attention_mask=mask).logits, expected)


def test_a_family_that_routes_through_the_interface_gets_no_patch():
    for family in ("llama", "gpt2"):
        assert patches.find_patch(tiny_model(family)) is None
    for family in ("gptj", "codegen"):
        model = tiny_model(family)
        assert (patches.find_patch(model) is None) == routes_through_interface(family)
    for variant in ("falcon", "falcon_new_arch"):
        model = tiny_model(variant)
        assert (patches.find_patch(model) is None) == routes_through_interface("falcon")
        assert _compat.routes_through_interface(model) == routes_through_interface("falcon")


def test_patches_live_in_hf_paged_namespace_only():
    assert patches.__name__ == "hf_paged.patches"
    assert importlib.util.find_spec("patches") is None or "hf_paged" not in str(importlib.util.find_spec("patches").origin)


FALCON_RW = dict(alibi=True, multi_query=False, parallel_attn=False, bias=True)  # Falcon-RW's layout


@pytest.mark.parametrize(
    "variant", [FALCON_RW, dict(alibi=True), dict(alibi=True, new_decoder_architecture=True, num_kv_heads=2)],
    ids=["falcon_rw", "multi_query", "new_arch"],
)
@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_falcon_with_alibi_gives_stocks_tokens(variant, mode):
    """Issue 30 point 5: stock adds its ALiBi bias to the mask rounded to bfloat16 at absolute
    positions; every forward runs dense over the pages (hf_paged/cache/dense.py), with stock's mask."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(transformers.FalconConfig(**FALCON, **variant)).eval()
    if variant.get("new_decoder_architecture") and not routes_through_interface("falcon"):
        # The patched release (5.23) broadcasts grouped K/V before caching them: refused at wrap(),
        # the model left as it was.
        model = copy.deepcopy(stock)
        with pytest.raises(hf_paged.UnsupportedModelError, match="supported from transformers 5.25"):
            hf_paged.wrap(model, num_pages=128, page_size=4)
        assert not hasattr(model, "hf_paged_runtime")
        return
    model = hf_paged.wrap(copy.deepcopy(stock), num_pages=128, page_size=4)
    input_ids, mask = padded_prompts(batch=3, length=9, pads=(0, 3, 0))
    input_ids[2, -2:], mask[2, -2:] = 0, 0  # and right padding
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **MODES[mode])
    torch.manual_seed(0)
    expected = stock.generate(input_ids, attention_mask=mask, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(model.generate(input_ids, attention_mask=mask, **kwargs), expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_falcon_rw_alibi_at_positions_bfloat16_rounds():
    """A prompt of 600 tokens: bfloat16 keeps 8 significant bits, so stock's bias is rounded there."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(transformers.FalconConfig(**FALCON, **FALCON_RW)).eval()
    model = hf_paged.wrap(copy.deepcopy(stock), num_pages=256, page_size=8)
    input_ids = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    expected, got = stock.generate(input_ids, **kwargs), model.generate(input_ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
