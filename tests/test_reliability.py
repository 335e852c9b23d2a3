"""What users do to a wrapped model: change its dtype, pad on the right, interrupt, wrap what cannot be wrapped."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, StoppingCriteriaList
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_paged
from hf_paged import PagedCache, UnsupportedModelError
from hf_paged.integration.wrap import ATTN_NAME

from tiny import COMMON, Interrupt, generate, padded_prompts, tiny_model


def _generate(model, input_ids, mask, **kwargs):
    return generate(model, input_ids, mask, max_new_tokens=5, **kwargs)


# -- the pool follows the model ----------------------------------------------------------------


def test_after_model_to_another_dtype_the_next_generate_makes_a_matching_pool():
    input_ids, mask = padded_prompts()
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    for dtype in (torch.float64, torch.bfloat16, torch.float32):
        stock = tiny_model("llama").to(dtype)
        model.to(dtype)
        for kwargs in (dict(), dict(num_beams=3)):
            assert torch.equal(_generate(model, input_ids, mask, **kwargs), _generate(stock, input_ids, mask, **kwargs))
        pools = model.hf_paged_runtime.pool.pools
        assert {pool.dtype for pool in pools} == {dtype}
        assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    model.half()
    assert torch.equal(_generate(model, input_ids, mask), _generate(tiny_model("llama").half(), input_ids, mask))
    assert model.hf_paged_runtime.pool.pools[0].dtype == torch.float16


def test_an_open_cache_keeps_its_pool_and_says_what_to_do_after_a_dtype_change():
    input_ids, mask = padded_prompts()
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    cache = PagedCache(model)
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"dtype or device changed.*1 PagedCache.*release\(\)"):
        _generate(model, input_ids, mask)
    with torch.no_grad(), pytest.raises(ValueError, match=r"changed after this PagedCache was created.*release\(\)"):
        model(input_ids, attention_mask=mask, past_key_values=cache)
    assert cache.tables.num_rows == 0  # refused before it took a page
    cache.release()
    stock = tiny_model("llama").to(torch.float64)
    assert torch.equal(_generate(model, input_ids, mask), _generate(stock, input_ids, mask))


def test_a_dtype_change_between_forwards_of_an_open_cache_is_refused_before_the_next_writes():
    """After a cache's first forward only the first layer is checked per forward: `model.to()` moves them all."""
    input_ids, mask = padded_prompts()
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    with PagedCache(model) as cache, torch.no_grad():
        model(input_ids, attention_mask=mask, past_key_values=cache)
        held = cache.tables.num_tokens
        model.to(torch.float64)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with pytest.raises(ValueError, match=r"changed after this PagedCache was created.*release\(\)"):
            model(input_ids[:, -1:], attention_mask=step_mask, past_key_values=cache)
        assert cache.tables.num_tokens == held  # refused before it placed a token


# -- interruptions -----------------------------------------------------------------------------


def test_an_interrupt_mid_beam_search_returns_every_page():
    input_ids, mask = padded_prompts()
    expected = _generate(tiny_model("llama"), input_ids, mask, num_beams=4)
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    with pytest.raises(KeyboardInterrupt):
        _generate(model, input_ids, mask, num_beams=4, stopping_criteria=StoppingCriteriaList([Interrupt(3)]))
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    assert torch.equal(_generate(model, input_ids, mask, num_beams=4), expected)


# -- wrap and unwrap ---------------------------------------------------------------------------


@pytest.fixture
def unregistered():
    """No hf_paged function registered with transformers (as in a fresh process); restored afterwards."""
    mappings = (ALL_ATTENTION_FUNCTIONS._global_mapping, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
    saved = [mapping.pop(ATTN_NAME, None) for mapping in mappings]
    yield mappings
    for mapping, function in zip(mappings, saved):
        if function is not None:
            mapping[ATTN_NAME] = function


def _assert_untouched(model, implementation, mappings):
    assert model.config._attn_implementation == implementation
    assert not any(hasattr(module, "hf_paged_runtime") for module in model.modules())
    assert "generate" not in model.__dict__
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    assert all(ATTN_NAME not in mapping for mapping in mappings)


def test_a_refused_attention_implementation_leaves_no_trace(unregistered, monkeypatch):
    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    original = type(model).set_attn_implementation

    def keep_own(self, name):  # a model that will not take another attention implementation
        return original(self, implementation)

    monkeypatch.setattr(type(model), "set_attn_implementation", keep_own)
    with pytest.raises(UnsupportedModelError, match="cannot be replaced"):
        hf_paged.wrap(model, num_pages=8)
    _assert_untouched(model, implementation, unregistered)


def _tiny_gpt_oss():
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8, **COMMON,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def test_attention_sinks_are_refused_at_wrap(unregistered):
    model = _tiny_gpt_oss()
    implementation = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match="GptOssAttention uses attention sinks"):
        hf_paged.wrap(model, num_pages=8)
    _assert_untouched(model, implementation, unregistered)


def test_attention_sinks_are_found_from_the_layers_not_the_model_type(unregistered):
    """A family hf_paged has never heard of, whose layers carry sinks, is refused the same way."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(UnsupportedModelError, match="LlamaAttention uses attention sinks"):
        hf_paged.wrap(model, num_pages=8)


def test_unwrap_restores_a_generate_the_user_set_on_the_instance():
    model = tiny_model("llama")
    calls = []

    def my_generate(*args, **kwargs):
        calls.append(kwargs)
        return type(model).generate(model, *args, **kwargs)

    model.generate = my_generate
    hf_paged.wrap(model, num_pages=32)
    assert model.generate is not my_generate
    hf_paged.unwrap(model)
    assert model.generate is my_generate
    model.generate(torch.tensor([[5, 6]]), max_new_tokens=1, pad_token_id=0)
    assert len(calls) == 1


def test_a_model_that_drops_the_cache_keyword_is_served_through_its_threads_forward():
    """Some families pass no keywords down to their attention (StableLM, the patched ones): the
    attention then finds the cache of this thread's running forward, and the tokens are stock's."""
    model = tiny_model("llama")
    input_ids, mask = padded_prompts()
    expected = _generate(model, input_ids, mask)
    hf_paged.wrap(model, num_pages=32, page_size=4)

    def drop(module, args, kwargs):  # as a decoder layer that does not pass **kwargs on would
        kwargs.pop("hf_paged_cache", None)
        return args, kwargs

    handle = model.model.layers[1].register_forward_pre_hook(drop, with_kwargs=True)
    try:
        assert torch.equal(_generate(model, input_ids, mask), expected)
    finally:
        handle.remove()
    assert model.hf_paged_runtime.forward_cache() is None  # nothing left behind after the call
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
