"""What a user meets after ordinary mistakes (issue 20): a clear error raised before anything changes,
or it keeps working; and every page returns to the pool.
"""

import gc
import inspect

import pytest
import torch

import hf_paged
from hf_paged import PagedCache
from hf_paged.cache.runtime import find_runtime

from tiny import padded_prompts, tiny_model


def generate(model, input_ids, mask, **kwargs):
    return model.generate(input_ids, attention_mask=mask, pad_token_id=0, max_new_tokens=6, **kwargs)


@pytest.mark.parametrize("prefix_cache", [False, True])
@pytest.mark.parametrize("how", ["config", "set_attn_implementation"])
def test_changing_the_attention_implementation_after_wrap_gives_stocks_tokens(prefix_cache, how):
    """Issue 30 point 4: the next generate() runs with stock's tokens and no error; the new
    implementation serves what the paged path does not (here: attention weights); unwrap keeps it."""
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 4))
    reference = tiny_model("llama")
    reference.set_attn_implementation("eager")
    expected = generate(reference, input_ids, mask, num_beams=2, output_attentions=True, return_dict_in_generate=True)
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4, prefix_cache=prefix_cache)
    generate(model, input_ids, mask)
    if how == "config":
        model.config._attn_implementation = "eager"  # what transformers' own tests do to an assistant
    else:
        model.set_attn_implementation("eager")
    got = generate(model, input_ids, mask, num_beams=2, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.attentions[0][0] is not None  # eager's weights: sdpa, the implementation before, returns none
    torch.testing.assert_close(got.attentions[-1][-1], expected.attentions[-1][-1])
    assert model.config._attn_implementation == "hf_paged"  # the pages serve it again
    assert torch.equal(generate(model, input_ids, mask, num_beams=2), expected.sequences)
    del got
    hf_paged.unwrap(model)
    assert model.config._attn_implementation == "eager"  # unwrap restores what the user set last
    assert torch.equal(generate(model, input_ids, mask, num_beams=2), expected.sequences)


def test_changing_the_attention_implementation_while_a_cache_is_open_keeps_serving_it():
    """Every forward reads the implementation (a user's own cache spans several forwards)."""
    reference = tiny_model("llama")
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    input_ids, _ = padded_prompts(batch=1, length=9, pads=(0,))
    with PagedCache(model) as cache, torch.no_grad():
        model(input_ids=input_ids, past_key_values=cache)
        model.set_attn_implementation("eager")
        logits = model(input_ids=input_ids[:, -1:], past_key_values=cache).logits
    expected = reference(torch.cat([input_ids, input_ids[:, -1:]], dim=1)).logits[:, -1:]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_wrap_takes_a_mapping_of_settings():
    model = hf_paged.wrap(tiny_model("llama"), {"page_size": 8, "num_pages": 16})
    stats = hf_paged.memory_stats(model)
    assert stats["page_size"] == 8 and stats["num_pages"] == 16


@pytest.mark.parametrize(
    "config, message",
    [
        (["page_size", 8], r"expected a PagedConfig, a mapping of its fields .* got list"),
        (8, r"expected a PagedConfig, a mapping of its fields .* got int"),
        ({"pagesize": 8}, r"unknown PagedConfig field\(s\) \['pagesize'\]"),
    ],
)
def test_wrap_refuses_other_configs_with_a_type_error_and_leaves_the_model_alone(config, message):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=message):
        hf_paged.wrap(model, config)
    assert find_runtime(model) is None and model.config._attn_implementation != "hf_paged"


def fill(model, cache):
    """One forward that stores 13 tokens per row in `cache`."""
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 4))
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids, attention_mask=mask, use_cache=True, **{cache_arg: cache})


def test_a_dropped_cache_gives_its_pages_back_when_collected():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=16, page_size=4)
    cache = PagedCache(model)
    fill(model, cache)
    assert hf_paged.memory_stats(model)["pages_in_use"] > 0
    del cache
    gc.collect()
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    # In a reference cycle, and the next call needs the whole pool.
    cache = PagedCache(model)
    fill(model, cache)
    cycle = [cache]
    cycle.append(cycle)
    cache.cycle = cycle
    del cache, cycle
    gc.collect()
    input_ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(3))
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=0, max_new_tokens=4)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_a_released_cache_names_the_cache_argument_of_the_installed_release():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with PagedCache(model) as cache:
        pass
    with pytest.raises(RuntimeError, match=rf"released.*pass it as {name}="):
        fill(model, cache)
