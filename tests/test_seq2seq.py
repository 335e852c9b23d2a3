"""Encoder-decoder models (docs/seq2seq.md): every family in every mode against stock, element by
element (tokens, scores, sequences_scores, beam_indices), fp32 CPU; cross-attention pages counted
once per input; what is refused, refused before anything changes."""

import pytest
import torch
from seq2seq_models import MODES, SEQ2SEQ, assert_same, features, make, run, sources
from transformers.modeling_outputs import BaseModelOutput

import hf_paged
from hf_paged import UnsupportedModelError

PAGE = 4  # sources of 30, 21 and 5 tokens: 8, 6 and 2 pages; they differ by more than a page


def _compare(model, inputs, settings, page_size=PAGE):
    expected = {mode: run(model, inputs, **kwargs) for mode, kwargs in settings.items()}
    hf_paged.wrap(model, page_size=page_size)
    try:
        for mode, kwargs in settings.items():
            assert_same(run(model, inputs, **kwargs), expected[mode])
            assert hf_paged.memory_stats(model)["pages_in_use"] == 0  # every page back when the call ends
    finally:
        hf_paged.unwrap(model)


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_family_matches_stock_in_every_mode(family):
    _compare(make(family), sources(), MODES)


@pytest.mark.parametrize("family", ["marian", "t5"])
def test_forced_decoder_prefix_and_encoder_outputs(family):
    model = make(family)
    batch = sources()
    prefix = torch.tensor([[0, 5, 6, 7]] * 3)
    with torch.no_grad():
        encoded = model.get_encoder()(**batch)

    def given():  # generate() expands a passed encoder output in place: a new one per call
        states = BaseModelOutput(last_hidden_state=encoded.last_hidden_state.clone())
        return dict(encoder_outputs=states, attention_mask=batch["attention_mask"])

    expected = [run(model, batch, decoder_input_ids=prefix, num_beams=3), run(model, given(), num_beams=3, num_return_sequences=3)]
    hf_paged.wrap(model, page_size=PAGE)
    assert_same(run(model, batch, decoder_input_ids=prefix, num_beams=3), expected[0])
    assert_same(run(model, given(), num_beams=3, num_return_sequences=3), expected[1])


def test_whisper_on_input_features():
    model = make("whisper")
    settings = {**MODES, "prompt": dict(decoder_input_ids=torch.tensor([[1, 7, 9]] * 2), num_beams=2)}
    _compare(model, features(), settings)


def _whisper_with_timestamps():
    model = make("whisper")
    settings = model.generation_config
    settings.no_timestamps_token_id, settings.prev_sot_token_id, settings.max_initial_timestamp_index = 50, 51, 5
    return model


def test_whisper_prompt_ids_and_temperature_fallback():
    # logprob_threshold above any random model's: every temperature of the fallback runs (sampling
    # after the first), each on its own paged cache
    settings = {
        "fallback": dict(temperature=(0.0, 0.4, 0.8), logprob_threshold=-0.1, compression_ratio_threshold=None),
        "prompt_ids": dict(prompt_ids=torch.tensor([51, 7, 9])),
    }
    _compare(_whisper_with_timestamps(), features(), settings)


def test_whisper_long_form_with_fallback_and_previous_tokens():
    model = _whisper_with_timestamps()
    inputs = dict(input_features=torch.randn(1, 8, 200, generator=torch.Generator().manual_seed(4)))
    kwargs = dict(max_new_tokens=8, return_timestamps=True, condition_on_prev_tokens=True, temperature=(0.0, 0.5),
                  logprob_threshold=-0.1, compression_ratio_threshold=None)
    torch.manual_seed(1)
    expected = model.generate(**inputs, **kwargs)  # three segments of 80 frames (long-form: tokens only)
    hf_paged.wrap(model, page_size=PAGE)
    torch.manual_seed(1)
    assert torch.equal(model.generate(**inputs, **kwargs), expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_source_longer_than_many_pages_and_left_padding():
    model = make("bart")
    long = sources((120, 3), seed=5)  # 30 pages of 4 tokens
    left = sources((17, 9), seed=6)
    left = {name: torch.flip(tensor, dims=[1]) for name, tensor in left.items()}  # pads first
    _compare(model, long, {"beam": MODES["beam"]})
    _compare(model, left, {"greedy": {}, "beam": MODES["beam"]})


def test_cross_attention_pages_are_written_once_per_input():
    model = make("marian")
    batch = sources()
    hf_paged.wrap(model, page_size=PAGE)
    run(model, batch, num_beams=4, num_return_sequences=4)
    stats = hf_paged.memory_stats(model)
    per_input = sum(-(-n // PAGE) for n in (30, 21, 5))  # 16 pages whatever the beams
    assert stats["peak_cross_attention_pages"] == per_input
    assert [g.get("cross_attention", False) for g in stats["groups"]] == [False, True]
    # 12 beams of 11 decoder tokens: at least ceil(11 / 4) pages each, shared where they agree
    assert 0 < stats["peak_self_attention_pages"] <= 12 * 3 + 12
    assert stats["peak_pages_in_use"] >= stats["peak_cross_attention_pages"] + stats["peak_self_attention_pages"] - 12
    assert stats["pages_in_use"] == 0


def test_pool_peak_is_below_stock_bytes_with_beams():
    """Stock stores each beam's copy of the cross-attention K/V; the pool holds it once per input."""
    from transformers.cache_utils import EncoderDecoderCache

    from hf_paged.integration.stats import cache_kv_bytes

    model = make("marian")
    batch = sources((30, 30))
    expected = run(model, batch, num_beams=6)
    cache = expected.past_key_values if hasattr(expected, "past_key_values") else expected.cache
    assert isinstance(cache, EncoderDecoderCache)
    stock = cache_kv_bytes(cache.self_attention_cache) + cache_kv_bytes(cache.cross_attention_cache)
    hf_paged.wrap(model, page_size=PAGE)
    assert_same(run(model, batch, num_beams=6), expected)
    peak = hf_paged.memory_stats(model)["peak_pool_bytes"]
    assert peak < 0.75 * stock, (peak, stock)


@pytest.mark.parametrize("setting", [dict(compile=True), dict(prefix_cache=True)])  # fp8 pages: tests/test_fp8.py
def test_refused_settings_leave_the_model_untouched(setting):
    model = make("marian")
    batch = sources()
    expected = run(model, batch, num_beams=2)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        hf_paged.wrap(model, **setting)
    assert not hasattr(model, "hf_paged_runtime") and "_prepare_cache_for_generation" not in model.__dict__
    assert_same(run(model, batch, num_beams=2), expected)


def test_tensor_parallelism_is_refused_before_anything_is_touched():
    from hf_paged.config import PagedConfig
    from hf_paged.integration import seq2seq

    with pytest.raises(UnsupportedModelError, match="tensor parallelism"):
        seq2seq.check_config(make("marian"), PagedConfig(), tp=object())  # wrap() asks before anything else


def test_flashinfer_backend_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="torch executor"):
        hf_paged.wrap(make("t5"), backend="flashinfer")


def test_empty_source_is_a_clear_error_and_takes_no_page():
    model = hf_paged.wrap(make("marian"), page_size=PAGE)
    batch = sources((4, 3))
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="empty source"):
        model.generate(**batch, max_new_tokens=3)
    with pytest.raises(ValueError, match="empty source"):
        model.generate(input_ids=torch.zeros((2, 0), dtype=torch.long), max_new_tokens=3)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    assert_same(run(model, sources()), run(hf_paged.unwrap(make("marian")), sources()))


def test_unwrap_restores_the_model():
    model = make("t5")
    expected = run(model, sources(), num_beams=3)
    hf_paged.unwrap(hf_paged.wrap(model))
    for module in model.modules():
        assert not any(name.startswith("hf_paged") for name in module.__dict__)
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert_same(run(model, sources(), num_beams=3), expected)


def test_assisted_decoding_matches_stock():
    model, assistant = make("marian"), make("marian")
    torch.manual_seed(7)
    for parameter in assistant.parameters():  # another model with the same vocabulary
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    batch = sources((12,))
    expected = run(model, batch, assistant_model=assistant)
    hf_paged.wrap(model, page_size=PAGE)
    assert_same(run(model, batch, assistant_model=assistant), expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_your_own_forward_on_a_paged_encoder_decoder_cache():
    from hf_paged.cache.cross import PagedEncoderDecoderCache

    model, batch = make("bart"), sources()
    decoder_ids = torch.tensor([[0, 5, 6, 7]] * 3)
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=decoder_ids).logits
    hf_paged.wrap(model, page_size=PAGE)
    cache = hf_paged.PagedCache(model)
    with pytest.raises(ValueError, match="PagedEncoderDecoderCache"), torch.no_grad():
        model(**batch, decoder_input_ids=decoder_ids, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        first = model(**batch, decoder_input_ids=decoder_ids[:, :2], past_key_values=PagedEncoderDecoderCache(cache, cache.cross))
        encoded = BaseModelOutput(last_hidden_state=first.encoder_last_hidden_state)
        rest = model(encoder_outputs=encoded, attention_mask=batch["attention_mask"], decoder_input_ids=decoder_ids[:, 2:],
                     past_key_values=first.past_key_values)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), expected)
    cache.release()
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_copies_of_a_wrapped_model_generate_on_their_own_pools():
    import copy
    import pickle

    model, batch = make("t5"), sources()
    expected = run(model, batch, num_beams=3)
    hf_paged.wrap(model, page_size=PAGE)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_same(run(twin, batch, num_beams=3), expected)
        assert twin.hf_paged_runtime.pool is not model.hf_paged_runtime.pool
    assert_same(run(model, batch, num_beams=3), expected)


@pytest.mark.parametrize("family", ["marian", "t5"])
def test_a_fragmented_pool_gives_the_same_outputs(family, monkeypatch):
    """Inputs whose cross-attention pages are not one run of consecutive pages are gathered by slot
    (the other layout of cache/cross.py): the same outputs."""
    from hf_paged.cache.cross import CrossPages
    from hf_paged.memory.tables import PageTables

    layouts = []
    prepare = CrossPages.prepare

    def recording_prepare(self, *args):
        prepare(self, *args)
        layouts.append(self.head_major)

    monkeypatch.setattr(CrossPages, "prepare", recording_prepare)
    model = make(family)
    settings = {"greedy": {}, "beam": MODES["beam"]}
    expected = {mode: run(model, sources(), **kwargs) for mode, kwargs in settings.items()}
    hf_paged.wrap(model, page_size=PAGE, num_pages=400)
    monkeypatch.setattr(PageTables, "reserve", lambda self, *args, **kwargs: False)
    blocks = model.hf_paged_runtime.pool.blocks
    held = blocks.allocate(200)
    blocks.free(held[::2])  # every other page free: no two consecutive pages come off the free stack
    for mode, kwargs in settings.items():
        got = run(model, sources(), **kwargs)
        assert_same(got, expected[mode])
    blocks.free(held[1::2])
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    assert layouts == [False, False]  # the slot layout ran


def test_out_of_pages_gives_every_page_back():
    from hf_paged import OutOfPagesError

    model = make("marian")
    expected = run(model, sources((5, 3)), num_beams=2)
    hf_paged.wrap(model, page_size=PAGE, num_pages=20)
    with pytest.raises(OutOfPagesError):  # 8 + 6 + 2 cross-attention pages and a page for each of 6 beams
        run(model, sources(), num_beams=2)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    assert_same(run(model, sources((5, 3)), num_beams=2), expected)


def test_threads_generate_on_one_model():
    from concurrent.futures import ThreadPoolExecutor

    model = make("t5")
    batches = [sources((9, 4), seed=s) for s in range(4)]
    expected = [run(model, batch, num_beams=2) for batch in batches]
    hf_paged.wrap(model, page_size=PAGE)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda batch: model.generate(**batch, max_new_tokens=10, num_beams=2,
                                                          output_scores=True, return_dict_in_generate=True), batches))
    for ours, theirs in zip(got, expected):
        assert torch.equal(ours.sequences, theirs.sequences)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
