"""The prefix cache never serves K/V the current model would not compute (issue 20).

Changes that move neither a parameter's storage nor its version counter: an edit through `.data`,
PEFT adapters switched, set, merged or unmerged, hooks added or removed. Each test fills the cache,
makes the change, and expects the unwrapped model's tokens with no page computed before the
change read (`prefix_hits` unchanged). Expected tokens always come from an unwrapped model.
"""

import pytest
import torch

import hf_paged

from tiny import padded_prompts, tiny_model

peft = pytest.importorskip("peft")  # in the test extra; skipped only outside it


def generate(model, input_ids, mask, **kwargs):
    torch.manual_seed(7)
    kwargs.setdefault("max_new_tokens", 6)
    return model.generate(input_ids, attention_mask=mask, pad_token_id=0, **kwargs)


def prompts():
    return padded_prompts(batch=2, length=17, pads=(0, 3))


def wrap(model):
    return hf_paged.wrap(model, num_pages=64, page_size=4, prefix_cache=True)


def fill(model, input_ids, mask) -> int:
    """Two calls: the first keeps the prompt pages, the second reads them. Returns the hits so far."""
    generate(model, input_ids, mask)
    generate(model, input_ids, mask)
    hits = hf_paged.memory_stats(model)["prefix_hits"]
    assert hits > 0
    return hits


def assert_fresh(model, input_ids, mask, expected, hits):
    assert torch.equal(generate(model, input_ids, mask), expected)
    assert hf_paged.memory_stats(model)["prefix_hits"] == hits  # nothing computed before the change was read


def test_an_edit_through_data_empties_the_cache():
    """`.data` bumps no version counter: the sampled values catch it."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    input_ids, mask = prompts()
    reference.model.layers[0].self_attn.v_proj.weight.data.mul_(-2.0)
    expected = generate(reference, input_ids, mask)
    wrap(model)
    hits = fill(model, input_ids, mask)
    model.model.layers[0].self_attn.v_proj.weight.data.mul_(-2.0)
    assert_fresh(model, input_ids, mask, expected, hits)


def hook_steering(module, args, output):
    return output * -3.0


def pre_hook_steering(module, args):
    return (args[0] * -3.0,)


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
def test_a_hook_added_between_calls_empties_the_cache(kind):
    model = tiny_model("llama")
    input_ids, mask = prompts()
    target = model.model.layers[0].self_attn.k_proj

    def add():
        if kind == "forward_hook":
            return target.register_forward_hook(hook_steering)
        return target.register_forward_pre_hook(pre_hook_steering)

    handle = add()
    expected = generate(model, input_ids, mask)  # stock, with the hook
    handle.remove()
    wrap(model)
    hits = fill(model, input_ids, mask)
    handle = add()
    assert_fresh(model, input_ids, mask, expected, hits)
    handle.remove()  # and removing it again: the pages computed with the hook are not read either
    hf_paged.unwrap(model)
    expected = generate(model, input_ids, mask)
    wrap(model)
    hits = fill(model, input_ids, mask)
    handle = add()
    generate(model, input_ids, mask)
    generate(model, input_ids, mask)  # the cache now holds pages computed with the hook
    hits = hf_paged.memory_stats(model)["prefix_hits"]
    handle.remove()
    assert_fresh(model, input_ids, mask, expected, hits)


def lora_model(adapters=("first",)):
    """The tiny llama with LoRA adapters on its K and V projections, initialised away from zero."""
    model = tiny_model("llama")
    for index, name in enumerate(adapters):
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(100 + index)
        if index == 0:
            model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def test_peft_models_hit_the_prefix_cache_and_match_stock():
    model = lora_model()
    input_ids, mask = prompts()
    expected = generate(model, input_ids, mask)
    expected_beams = generate(model, input_ids, mask, num_beams=3)
    wrap(model)
    for _ in range(2):
        assert torch.equal(generate(model, input_ids, mask), expected)
    stats = hf_paged.memory_stats(model)
    assert stats["prefix_lookup_tokens"] > 0 and stats["prefix_hits"] > 0
    assert torch.equal(generate(model, input_ids, mask, num_beams=3), expected_beams)
    assert hf_paged.memory_stats(model)["prefix_hits"] > stats["prefix_hits"]


@pytest.mark.parametrize(
    "settings", [dict(num_beams=3, max_new_tokens=8), dict(do_sample=True, num_return_sequences=3, max_new_tokens=8)]
)
def test_peft_models_fork_left_padded_rows_at_stock_positions(settings):
    """Without the prefix cache too: the prompt prefilled once before forking gets explicit
    positions through the PeftModel's `**kwargs` (its own signature names none)."""
    model = lora_model()
    input_ids, mask = padded_prompts(batch=2, length=17, pads=(0, 5))
    expected = generate(model, input_ids, mask, **settings)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    assert torch.equal(generate(model, input_ids, mask, **settings), expected)


def test_disabling_a_peft_adapter_empties_the_cache():
    model = lora_model()
    input_ids, mask = prompts()
    with model.disable_adapter():
        expected_off = generate(model, input_ids, mask)
    expected_on = generate(model, input_ids, mask)
    assert not torch.equal(expected_on, expected_off)  # the adapter changes the tokens
    wrap(model)
    hits = fill(model, input_ids, mask)
    with model.disable_adapter():
        assert_fresh(model, input_ids, mask, expected_off, hits)
        hits = fill(model, input_ids, mask)
    assert_fresh(model, input_ids, mask, expected_on, hits)  # and enabling it again


def test_setting_another_peft_adapter_empties_the_cache():
    model = lora_model(("first", "second"))
    input_ids, mask = prompts()
    model.set_adapter("second")
    expected = generate(model, input_ids, mask)
    model.set_adapter("first")
    wrap(model)
    hits = fill(model, input_ids, mask)
    model.set_adapter("second")
    assert_fresh(model, input_ids, mask, expected, hits)


@pytest.mark.parametrize("change", ["merge", "unmerge"])
def test_merging_or_unmerging_a_peft_adapter_empties_the_cache(change):
    """Merging edits the base weights through `.data`; the same steps on an identical model give stock."""
    model, reference = lora_model(), lora_model()
    input_ids, mask = prompts()
    reference.merge_adapter()
    if change == "unmerge":
        reference.unmerge_adapter()
        model.merge_adapter()
    expected = generate(reference, input_ids, mask)
    wrap(model)
    hits = fill(model, input_ids, mask)
    model.merge_adapter() if change == "merge" else model.unmerge_adapter()
    assert_fresh(model, input_ids, mask, expected, hits)


def test_the_key_is_stable_when_nothing_changes():
    """Otherwise the cache would be emptied on every call and never hit."""
    from hf_paged.model_state import model_state_key

    model = lora_model()
    wrap(model)
    input_ids, mask = prompts()
    generate(model, input_ids, mask)
    key = model_state_key(model)
    generate(model, input_ids, mask)
    assert model_state_key(model) == key


def test_a_forward_replaced_on_an_instance_empties_the_cache():
    """Monkeypatching a module's forward (not a hook) is seen too; hf_paged's own swap is not a change."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    input_ids, mask = prompts()

    def steer(projection):
        original = projection.forward
        projection.forward = lambda x: original(x) * -3.0

    steer(reference.model.layers[0].self_attn.v_proj)
    expected = generate(reference, input_ids, mask)
    wrap(model)
    hits = fill(model, input_ids, mask)
    steer(model.model.layers[0].self_attn.v_proj)
    assert_fresh(model, input_ids, mask, expected, hits)
