"""wrap() again without new settings, pool budgets below one page, pools that cannot be allocated (issue 15)."""

import pytest
import torch

import hf_paged
from hf_paged import PagedConfig

from tiny import padded_prompts, tiny_model


def generate(model):
    input_ids, mask = padded_prompts()
    return model.generate(input_ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)


def test_wrap_with_no_settings_keeps_the_current_ones():
    model = hf_paged.wrap(tiny_model("llama"), page_size=4, num_pages=500)
    runtime = model.hf_paged_runtime
    assert hf_paged.wrap(model) is model
    assert model.hf_paged_runtime is runtime and runtime.config == PagedConfig(page_size=4, num_pages=500)


def test_new_settings_rewrap_from_the_defaults():
    model = hf_paged.wrap(tiny_model("llama"), page_size=4, num_pages=500)
    hf_paged.wrap(model, page_size=8, max_memory=1 << 20)  # an earlier num_pages must not beat the new budget
    assert model.hf_paged_runtime.config == PagedConfig(page_size=8, max_memory=1 << 20)
    assert hf_paged.memory_stats(model)["num_pages"] == (1 << 20) // (8 * 2 * 2 * 2 * 16 * 4)


def test_a_budget_below_one_page_is_a_value_error_before_anything_changes():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="smaller than one page .8192 bytes"):
        hf_paged.wrap(model, max_memory=10)
    assert not hasattr(model, "hf_paged_runtime") and model.config._attn_implementation != "hf_paged"
    expected = generate(model)
    hf_paged.wrap(model, page_size=4, num_pages=64)
    runtime = model.hf_paged_runtime
    with pytest.raises(ValueError, match="max_memory=10"):
        hf_paged.wrap(model, max_memory=10)
    assert model.hf_paged_runtime is runtime and torch.equal(generate(model), expected)


def test_a_pool_that_cannot_be_allocated_says_how_big_it_was_and_what_to_pass():
    model = tiny_model("llama")
    hf_paged.wrap(model, page_size=4, num_pages=64)
    runtime = model.hf_paged_runtime
    with pytest.raises(MemoryError, match=r"10{12} pages x 8192 bytes = .* GiB on \['cpu'\]; pass a smaller num_pages"):
        hf_paged.wrap(model, num_pages=10**12)
    assert model.hf_paged_runtime is runtime and runtime.pool.blocks.num_used_pages == 0
    assert len(model.model._forward_pre_hooks) == 1
