"""`del model` frees a wrapped model, its weights and its page pool at once, as it frees a stock model:
nothing wrap() adds links the model back to itself strongly (cache/runtime.BackRef), so no reference
cycle waits for the garbage collector. The collector is off in these tests: what they free, reference
counting alone freed (as `del model; torch.cuda.empty_cache()` needs on a GPU)."""

import contextlib
import copy
import gc
import pickle
import weakref

import peft
import pytest
import torch

import hf_paged

import seq2seq_models
from tiny import BASIC_MODES, padded_prompts, tiny_model


@contextlib.contextmanager
def no_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def watch(model) -> list[weakref.ref]:
    """Weak references to the model, one of its weights, its runtime and each of its pool's tensors."""
    runtime = model.hf_paged_runtime
    return [weakref.ref(model), weakref.ref(next(model.parameters())), weakref.ref(runtime)] + [
        weakref.ref(tensor) for tensor in runtime.pool.pools
    ]


def decoder_only_call(model, mode: str):
    input_ids, mask = padded_prompts()
    torch.manual_seed(0)
    return model.generate(input_ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **BASIC_MODES[mode])


# llama: the attention interface; bloom, mpt: hf_paged.patches on every supported release.
@pytest.mark.parametrize("family", ["llama", "bloom", "mpt"])
@pytest.mark.parametrize("mode", sorted(BASIC_MODES))
def test_del_frees_a_wrapped_decoder_only_model_and_its_pool(family, mode):
    with no_collector():
        model = hf_paged.wrap(tiny_model(family), num_pages=64, page_size=4)
        decoder_only_call(model, mode)
        refs = watch(model)
        del model
        assert [ref() is None for ref in refs] == [True] * len(refs)


@pytest.mark.parametrize("family", ["bart", "t5", "whisper"])
def test_del_frees_a_wrapped_encoder_decoder_model_and_its_pool(family):
    inputs = seq2seq_models.features() if family == "whisper" else seq2seq_models.sources()
    with no_collector():
        model = hf_paged.wrap(seq2seq_models.make(family), num_pages=256, page_size=4)
        seq2seq_models.run(model, inputs, **seq2seq_models.MODES["beam"])
        refs = watch(model)
        del model
        assert [ref() is None for ref in refs] == [True] * len(refs)


def test_del_frees_a_wrapped_peft_model_and_the_model_inside():
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    with no_collector():
        model = hf_paged.wrap(peft.get_peft_model(tiny_model("llama"), config).eval(), num_pages=64, page_size=4)
        decoder_only_call(model, "beam")
        refs = watch(model) + [weakref.ref(model.get_base_model())]
        del model
        assert [ref() is None for ref in refs] == [True] * len(refs)


def test_copies_link_to_themselves_and_outlive_the_original():
    """A deepcopy's and an unpickled copy's links point into the copy: the original's `del` frees the
    original only, and each copy still generates what the original generated."""
    with no_collector():
        model = hf_paged.wrap(tiny_model("bloom"), num_pages=64, page_size=4)
        expected = decoder_only_call(model, "beam")
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
        refs = watch(model)
        del model
        assert [ref() is None for ref in refs] == [True] * len(refs)
        for clone in copies:
            assert torch.equal(decoder_only_call(clone, "beam"), expected)
            refs = watch(clone)
            del clone
        copies.clear()
        assert [ref() is None for ref in refs] == [True] * len(refs)


def test_a_returned_cache_keeps_the_pool_until_it_is_dropped():
    """The pool stays while the user holds a cache on it; the model goes with `del model`."""
    with no_collector():
        model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
        input_ids, mask = padded_prompts()
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                             return_dict_in_generate=True)
        pool = weakref.ref(model.hf_paged_runtime.pool)
        model_ref = weakref.ref(model)
        del model
        assert model_ref() is None and pool() is not None
        del out
        assert pool() is None


@pytest.mark.slow
def test_a_compiled_model_goes_with_del_and_its_pool_with_the_next_collection():
    """compile=True: the model and its runtime go with `del model`. torch.compile's leftover tracing
    objects (dynamo's variable trackers) hold the compiled step's cache, and through it the pool, in
    reference cycles of their own: the pool goes at the next collection (`gc.collect()`)."""
    with no_collector():
        model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4, compile=True)
        input_ids, _ = padded_prompts()
        model.generate(input_ids[:1, 4:], max_new_tokens=6, pad_token_id=0, num_beams=2)
        assert model.hf_paged_runtime.compiled.num_compiled_steps > 0
        model_refs, pool_refs = watch(model)[:3], watch(model)[3:]
        del model
        assert [ref() is None for ref in model_refs] == [True] * len(model_refs)
        gc.collect()
        assert [ref() is None for ref in pool_refs] == [True] * len(pool_refs)


def test_a_generate_kept_without_its_model_says_to_keep_the_model():
    """The one behaviour the weak links change: stock's bound `model.generate` keeps its model alive,
    a wrapped model's does not. Calling it after the model is gone raises, saying what to do."""
    generate = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4).generate
    input_ids, mask = padded_prompts()
    with pytest.raises(ReferenceError, match="keep a reference to the model"):
        generate(input_ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
