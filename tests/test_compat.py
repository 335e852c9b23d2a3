"""Living with several transformers releases: the cache argument's name, outputs, the Cache API.

The suite runs on the oldest supported release (5.23.0) and the newest (.ci/run runs it on both);
these tests pin what differs between them, each on whichever release is installed.
"""

import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache

import hf_paged
from hf_paged import PagedCache, UnsupportedModelError, _compat

from tiny import RELEASE_DEPENDENT_CONFIGS, padded_prompts, tiny_model

FORWARD_TAKES_CACHE = "cache" in inspect.signature(transformers.LlamaModel.forward).parameters


def test_the_installed_release_is_detected_by_what_its_forward_takes():
    model = tiny_model("llama")
    expected = "cache" if FORWARD_TAKES_CACHE else "past_key_values"
    assert _compat.model_cache_arg(model) == expected
    assert _compat.cache_arg_name(model.model.forward) == expected
    assert _compat.OUTPUT_CACHE_FIELD == expected
    assert _compat.cache_arg_name(lambda input_ids, attention_mask=None: None) is None
    assert _compat.cache_arg_name(lambda input_ids, past_key_values=None: None) == "past_key_values"
    assert _compat.cache_arg_name(lambda input_ids, cache=None, past_key_values=None: None) == "cache"


def test_find_cache_looks_under_both_names_and_inside_kwargs():
    marker = object()
    assert _compat.find_cache({"cache": marker}) is marker
    assert _compat.find_cache({"past_key_values": marker}) is marker
    assert _compat.find_cache({"input_ids": 1, "kwargs": {"past_key_values": marker}}) is marker
    assert _compat.find_cache({"input_ids": 1, "kwargs": {}}) is None


def accepted_cache_names() -> list[str]:
    """Every name generate() and forward accept the cache under on the installed release."""
    return ["cache", "past_key_values"] if FORWARD_TAKES_CACHE else ["past_key_values"]


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_user_cache_under_each_accepted_name_matches_stock_and_comes_back(name):
    if name not in accepted_cache_names():
        # 5.23 rejects `cache=`: the wrapped generate must not accept what stock refuses.
        model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
        with PagedCache(model) as cache, pytest.raises(ValueError, match="cache"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, pad_token_id=0, **{name: cache})
        return
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 3))
    kwargs = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True)
    expected = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    with PagedCache(model) as cache:
        out = model.generate(input_ids, **kwargs, **{name: cache})
        assert torch.equal(out.sequences, expected.sequences)
        assert getattr(out, _compat.OUTPUT_CACHE_FIELD) is cache and not cache.is_released
        assert cache.get_seq_length() == input_ids.shape[1] + 5  # the last token is never fed back
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_the_cache_under_each_accepted_name(name):
    model = tiny_model("gpt2")
    if name not in accepted_cache_names():  # 5.23: `cache` is no parameter; it would be swallowed by **kwargs
        assert _compat.cache_arg_name(model.forward) == "past_key_values"
        return
    input_ids, _ = padded_prompts(batch=2, pads=(0, 0))
    with torch.no_grad():
        expected = model(input_ids).logits
    hf_paged.wrap(model, num_pages=32, page_size=4)
    with PagedCache(model) as cache, torch.no_grad():
        out = model(input_ids[:, :6], **{name: cache})
        assert _compat.output_cache(out) is cache
        logits = model(input_ids[:, 6:], **{name: cache}).logits
        assert cache.get_seq_length() == input_ids.shape[1]
    torch.testing.assert_close(logits, expected[:, 6:], rtol=1e-5, atol=1e-5)


def test_returned_cache_of_generate_sits_under_the_installed_field():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(getattr(out, _compat.OUTPUT_CACHE_FIELD), PagedCache)



def test_a_model_whose_forward_takes_neither_name_is_refused_with_the_version():
    model = tiny_model("llama")

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    # Every module that could be hooked loses its cache argument.
    for module in (model, model.model):
        module.forward = forward
    implementation = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError) as info:
        hf_paged.wrap(model, num_pages=8)
    message = str(info.value)
    assert f"transformers {transformers.__version__}" in message
    assert "cache or past_key_values" in message and "LlamaForCausalLM" in message
    assert model.config._attn_implementation == implementation and not hasattr(model, "hf_paged_runtime")


# The first release whose modeling code calls each family's attention through the attention
# interface, read off each release's source by hand (5.23.0: neither does; 5.24.0: both do).
INTERFACE_SINCE = {"gptj": (5, 24), "codegen": (5, 24)}
RELEASE = tuple(int(part) for part in transformers.__version__.split(".")[:2])


@pytest.mark.parametrize("family", sorted(RELEASE_DEPENDENT_CONFIGS))
def test_families_that_moved_to_the_interface_are_served_by_the_interface_or_a_patch(family):
    model = tiny_model(family)
    input_ids, mask = padded_prompts()
    modes = [dict(), dict(do_sample=True, num_return_sequences=2), dict(num_beams=3, num_return_sequences=2)]

    def generate(**kwargs):
        torch.manual_seed(3)
        return model.generate(input_ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **kwargs)

    expected = [generate(**mode) for mode in modes]
    hf_paged.wrap(model, num_pages=64, page_size=4)
    # Where the release's attention bypasses the interface (5.23), hf_paged.patches serves it.
    assert (model.hf_paged_runtime.patch is None) == (RELEASE >= INTERFACE_SINCE[family])
    for mode, tokens in zip(modes, expected):
        assert torch.equal(generate(**mode), tokens), (family, mode)


def test_paged_cache_answers_the_cache_api_as_dynamic_cache_does():
    """Every Cache method generate() or a user calls, side by side with DynamicCache."""
    model = tiny_model("llama")
    input_ids, _ = padded_prompts(batch=2, length=9, pads=(0, 0))

    def drive(cache) -> list:
        seen = []
        with torch.no_grad():
            model(input_ids, **{_compat.model_cache_arg(model): cache})
            seen += [cache.get_seq_length(), cache.get_mask_sizes(1, 0), cache.get_query_offset(0)]
            seen += [cache.is_compileable, cache.is_croppable, cache.is_initialized]
            seen += [cache.is_sliding, cache.is_linear, cache.is_dummy]
            cache.crop(0)
            cache.crop(-3)
            seen.append(cache.get_seq_length())
            with pytest.raises(ValueError):
                cache.crop(2)
            cache.batch_repeat_interleave(2)
            cache.batch_select_indices(torch.tensor([3, 0, 1]))
            cache.reorder_cache(torch.tensor([2, 2, 0], dtype=torch.int32))
            out = model(torch.tensor([[7], [8], [9]]), **{_compat.model_cache_arg(model): cache})
            seen.append(cache.get_seq_length())
        return seen, out.logits

    expected, expected_logits = drive(DynamicCache())
    hf_paged.wrap(model, num_pages=32, page_size=4)
    with PagedCache(model) as cache:
        got, logits = drive(cache)
        # DynamicCache answers -1 (its layers keep no batch size); PagedCache knows its rows.
        assert cache.batch_size == 3
    assert got == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
