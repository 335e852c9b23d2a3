"""A deepcopy or pickle of a wrapped model is a wrapped model of its own, with its own pool (issue 15)."""

import copy
import io
import os
import pickle

import torch

import hf_paged

from tiny import padded_prompts, tiny_model


def generate(model):
    input_ids, mask = padded_prompts()
    return model.generate(input_ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, num_beams=2)


def resident_mib() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def test_a_deepcopy_generates_with_its_own_weights_on_its_own_pool():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    original_tokens = generate(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.normal_()
    expected = generate(hf_paged.unwrap(copy.deepcopy(clone)))
    got = generate(clone)
    assert torch.equal(got, expected) and not torch.equal(got, original_tokens)
    assert clone.hf_paged_runtime.pool is not model.hf_paged_runtime.pool
    assert clone.hf_paged_runtime.attention_modules[0] is clone.model.layers[0].self_attn
    assert hf_paged.memory_stats(clone)["num_pages"] == 64 and hf_paged.memory_stats(clone)["pages_in_use"] == 0
    assert torch.equal(generate(model), original_tokens)  # the original still runs on its own
    assert model.hf_paged_runtime.last_peak_pages > 0 and clone.hf_paged_runtime.last_peak_pages > 0
    hf_paged.unwrap(clone)
    assert not hasattr(clone, "hf_paged_runtime") and "generate" not in vars(clone)
    assert len(clone.model._forward_pre_hooks) == 0 and len(model.model._forward_pre_hooks) == 1


def test_a_deepcopy_does_not_copy_the_pool():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=40_000, page_size=4)  # 160 MiB, never written
    before = resident_mib()
    clone = copy.deepcopy(model)
    assert resident_mib() - before < 40  # a copied pool would have made all 160 MiB resident
    assert "pool" not in vars(clone.hf_paged_runtime)  # made on first use
    assert hf_paged.memory_stats(clone)["num_pages"] == 40_000


def test_pickle_and_torch_save_give_a_wrapped_model_without_the_pool():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=40_000, page_size=4)
    expected = generate(model)
    data = pickle.dumps(model)
    assert len(data) < 8 << 20  # the weights (a few hundred KiB), not the 160 MiB pool
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(data), torch.load(buffer, weights_only=False)):
        assert loaded.config._attn_implementation == "hf_paged"
        assert torch.equal(generate(loaded), expected)
        assert loaded.hf_paged_runtime.pool is not model.hf_paged_runtime.pool
        assert torch.equal(generate(hf_paged.unwrap(loaded)), expected)
