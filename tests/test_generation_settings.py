"""Settings on the model's own generation config are read exactly as generate() reads them (issue 15)."""

import pytest
import torch
from transformers import GenerationConfig

import hf_paged

from tiny import generate, padded_prompts, tiny_model

NEW_TOKENS = 8

SETTINGS = {
    "use_cache": dict(use_cache=False),
    "num_beams": dict(num_beams=3),
    "num_return_sequences": dict(num_beams=3, num_return_sequences=2),
    "do_sample": dict(do_sample=True, num_return_sequences=3),
    "max_new_tokens": dict(max_new_tokens=11),
    "cache_implementation": dict(cache_implementation="static"),
}


run = generate  # seeded with 0


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("pads", [(0, 0), (0, 4)])
def test_settings_on_the_models_generation_config_give_stock_tokens(name, pads):
    input_ids, mask = padded_prompts(2, 13, pads)
    model = tiny_model("llama")
    for key, value in SETTINGS[name].items():
        setattr(model.generation_config, key, value)
    new = {} if name == "max_new_tokens" else dict(max_new_tokens=NEW_TOKENS)
    expected = run(model, input_ids, mask, **new)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    if name == "cache_implementation":
        with pytest.warns(UserWarning, match="cache_implementation='static'"):
            got = run(model, input_ids, mask, **new)
    else:
        got = run(model, input_ids, mask, **new)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert model.hf_paged_runtime.pool.blocks.num_used_pages == 0


def test_use_cache_false_on_the_model_runs_stock_and_leaves_the_pool_alone():
    input_ids, mask = padded_prompts(2, 13, (0, 0))
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    model.generation_config.use_cache = False
    run(model, input_ids, mask, max_new_tokens=NEW_TOKENS)
    assert model.hf_paged_runtime.last_peak_pages == 0


def test_a_passed_generation_config_is_completed_from_the_models_one():
    """generate() fills what a passed config leaves unset from model.generation_config (here num_beams)."""
    input_ids, mask = padded_prompts(2, 13, (0, 4))
    model = tiny_model("llama")
    expected = run(model, input_ids, mask, num_beams=3, max_new_tokens=NEW_TOKENS)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    run(model, input_ids, mask, num_beams=3, max_new_tokens=NEW_TOKENS)
    peak_as_keyword = model.hf_paged_runtime.last_peak_pages
    model.generation_config.num_beams = 3
    got = run(model, input_ids, mask, generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert torch.equal(got, expected)
    # Same plan as with the keyword: the prompt prefilled once and forked, not once per beam.
    assert model.hf_paged_runtime.last_peak_pages == peak_as_keyword
