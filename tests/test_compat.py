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

from tiny import RELEASE_DEPENDENT_CONFIGS, padded_prompts, routes_through_interface, tiny_model

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
    assert (model.hf_paged_runtime.patch is None) == routes_through_interface(family)
    for mode, tokens in zip(modes, expected):
        assert torch.equal(generate(**mode), tokens), (family, mode)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_attention_implementation_is_read_as_the_config_answers_it(implementation):
    """The hook reads it per forward from the attribute behind the config's property (for speed)."""
    model = tiny_model("llama")
    model.set_attn_implementation(implementation)
    assert _compat.attn_implementation(model.model.config) == model.model.config._attn_implementation == implementation
    hf_paged.wrap(model)
    assert _compat.attn_implementation(model.model.config) == model.model.config._attn_implementation == "hf_paged"
    assert _compat.attn_implementation(None) is None


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


# Cache members PagedCache leaves to stock's `Cache`, each safe as inherited: offsets from
# get_seq_length, and state of linear-attention / indexer / offloaded layers that wrap() refuses.
INHERITED_ON_PURPOSE = {
    "get_query_offset", "early_initialization", "offload", "prefetch", "has_previous_state",
    "get_conv_state", "get_recurrent_state", "update_conv_state", "update_recurrent_state",
    "increase_count", "update_indexer",
}


def test_paged_cache_defines_every_cache_member_of_the_installed_release():
    """A release that adds a Cache method (5.25 added get_recurrent_states_to_keep and an argument
    to activate_past_recording) fails here until PagedCache answers it or it is listed above."""
    from transformers.cache_utils import Cache

    # PagedCache's own members, or its mixins' (steps.ForwardSteps), which come before Cache in its MRO.
    ours = PagedCache.__mro__[: PagedCache.__mro__.index(Cache)]
    definitions = {name: next(cls.__dict__[name] for cls in ours if name in cls.__dict__)
                   for name in dir(Cache) if not name.startswith("_") and any(name in cls.__dict__ for cls in ours)}
    members = {name for name in dir(Cache) if not name.startswith("_")}
    own = set(definitions)
    assert members - own - INHERITED_ON_PURPOSE == set()
    for name in own:  # PagedCache takes every argument stock's method takes
        stock, paged = getattr(Cache, name), definitions[name]
        if inspect.isfunction(stock):
            taken = inspect.signature(paged).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in taken.values())
            for parameter in inspect.signature(stock).parameters.values():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    assert takes_any, name
                elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                    assert parameter.name in taken or takes_any, (name, parameter.name)


def test_past_recording_answers_as_dynamic_cache_does():
    """Assisted and prompt-lookup decoding: activate_past_recording with the arguments the installed
    release passes, then what stock's cache reports per layer (a window records, full attention not)."""
    model = tiny_model("qwen2")  # one full-attention layer and one sliding one
    input_ids, _ = padded_prompts(batch=1, length=9, pads=(0,))
    takes_keep = "recurrent_states_to_keep" in inspect.signature(DynamicCache.activate_past_recording).parameters
    arguments = dict(recurrent_states_to_keep=3) if takes_keep else {}

    def drive(cache) -> list:
        cache.activate_past_recording(**arguments)  # before the forwards it may crop, as generate() does
        with torch.no_grad():
            model(input_ids, **{_compat.model_cache_arg(model): cache})
        seen = [cache.is_recording_past(layer) for layer in range(2)]
        if hasattr(DynamicCache, "get_recurrent_states_to_keep"):
            seen += [cache.get_recurrent_states_to_keep(), cache.get_recurrent_states_to_keep(1)]
        cache.crop(-2)
        return seen + [cache.get_seq_length()]

    expected = drive(DynamicCache(config=model.config))
    assert expected[:2] == [False, True]
    hf_paged.wrap(model, num_pages=32, page_size=4)
    with PagedCache(model) as cache:
        assert drive(cache) == expected


def test_the_tested_range_is_the_one_pyproject_caps_and_ci_runs_inside_it():
    """pyproject.toml says the range once; the installed metadata (what wrap() reads) agrees with it,
    and CI's pinned newest release (.ci/run) lies inside it, as the installed one does."""
    import pathlib
    import re
    import tomllib

    from packaging.requirements import Requirement

    root = pathlib.Path(__file__).resolve().parent.parent
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = Requirement(next(line for line in dependencies if line.startswith("transformers")))
    assert _compat.TESTED is not None, "hf_paged is not installed (pip install -e .)"
    assert Requirement(f"transformers{_compat.TESTED}").specifier == pinned.specifier, "reinstall: pip install -e ."
    assert any(spec.operator == "<" for spec in pinned.specifier), "transformers must be capped"
    ci = (root / ".ci" / "run").read_text()
    for name in ("NEWEST_TRANSFORMERS", "OLDEST_TRANSFORMERS"):
        release = re.search(rf"^{name}=(\S+)$", ci, re.M).group(1)
        assert pinned.specifier.contains(release), (name, release)
    # (The installed release itself may lie past the cap: the canary workflow forces the newest.)


def test_wrap_warns_once_on_a_release_outside_the_tested_range(monkeypatch):
    import warnings

    monkeypatch.setattr(_compat, "_warned_untested", False)
    monkeypatch.setattr(_compat, "TRANSFORMERS_VERSION", "5.99.0")
    model = tiny_model("llama")
    input_ids, mask = padded_prompts()
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_paged.wrap(model, num_pages=16, page_size=4)
        hf_paged.wrap(tiny_model("llama"), num_pages=16, page_size=4)
    untested = [str(w.message) for w in caught if "tested on" in str(w.message)]
    assert len(untested) == 1, untested
    assert "transformers 5.99.0 is installed" in untested[0] and _compat.TESTED in untested[0]
    assert torch.equal(model.generate(input_ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0), expected)
