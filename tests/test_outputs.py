"""What generate() returns besides its tokens, and how it stops, wrapped and unwrapped (fp32, CPU):
hidden states, logits and scores, a streamer, stop strings, chunked prefill."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import hf_paged

from tiny import byte_tokenizer, fixed_length, generate, padded_prompts, tiny_model

NEW = 8


def assert_same_tensors(got, expected, what: str) -> None:
    """Tuples (per step, or per step and layer) of tensors: stock's shapes, values to fp32 rounding."""
    if isinstance(expected, torch.Tensor):
        assert got.shape == expected.shape, (what, got.shape, expected.shape)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(got)), what
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-4, msg=what)
        return
    assert len(got) == len(expected), (what, len(got), len(expected))
    for index, (ours, theirs) in enumerate(zip(got, expected)):
        assert_same_tensors(ours, theirs, f"{what}[{index}]")


@pytest.mark.parametrize("mode", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2), dict()])
@pytest.mark.parametrize("prefix_cache", [False, True])
def test_hidden_states_have_stocks_shapes_and_values(mode, prefix_cache):
    """Stock's first step holds the whole prompt's hidden states ([rows, prompt length, hidden]); a
    prompt prefilled before generate() (beams and samples fork it, the prefix cache reads it) left
    only the last token's ([rows, 1, hidden])."""
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 4))
    kwargs = dict(output_hidden_states=True, return_dict_in_generate=True, **fixed_length(NEW), **mode)
    expected = generate(model, input_ids, mask, **kwargs)
    rows = 2 * max(mode.get("num_beams", 1), mode.get("num_return_sequences", 1))
    assert expected.hidden_states[0][0].shape == (rows, 13, 64)
    hf_paged.wrap(model, num_pages=256, page_size=4, prefix_cache=prefix_cache)
    for _ in range(2):  # with the prefix cache, the second call finds the prompt's pages
        got = generate(model, input_ids, mask, **kwargs)
        assert torch.equal(got.sequences, expected.sequences)
        assert_same_tensors(got.hidden_states, expected.hidden_states, "hidden_states")
    got.past_key_values.release()  # a returned cache holds its pages until released or dropped
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == stats.get("cached_pages", 0)


@pytest.mark.parametrize(
    "family, mode",
    [
        ("llama", dict()),
        ("llama", dict(num_beams=3, num_return_sequences=2)),
        ("mistral", dict(do_sample=True, num_return_sequences=2)),  # a window on every layer
        ("bloom", dict(num_beams=3, do_sample=True)),  # a patched family, beam sampling
    ],
)
def test_logits_and_scores_match(family, mode):
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 5))
    kwargs = dict(output_logits=True, output_scores=True, return_dict_in_generate=True, **fixed_length(NEW), **mode)
    expected = generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=256, page_size=4)
    got = generate(model, input_ids, mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert_same_tensors(got.logits, expected.logits, "logits")
    assert_same_tensors(got.scores, expected.scores, "scores")
    if "num_beams" in mode:
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores)
        assert torch.equal(got.beam_indices, expected.beam_indices)


class Collect(BaseStreamer):
    """Records every put() (the prompt first, then each new token) and the end()."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_a_streamer_receives_stocks_tokens(family):
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=1, length=11, pads=(0,))
    streams = []
    for wrap in (False, True):
        if wrap:
            hf_paged.wrap(model, num_pages=64, page_size=4)
        streamer = Collect()
        generate(model, input_ids, mask, streamer=streamer, use_cache=True, **fixed_length(NEW))
        streams.append(streamer)
    stock, paged = streams
    assert len(paged.puts) == len(stock.puts) == NEW + 1 and paged.ended == stock.ended == 1
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(paged.puts, stock.puts))


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3)])
def test_stop_strings_stop_where_stock_stops(mode):
    model = tiny_model("llama")
    tokenizer = byte_tokenizer()
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 3))
    free = generate(model, input_ids, mask, **fixed_length(12), **mode)
    # Two tokens each row generates mid-sequence: every row stops early.
    stops = [tokenizer.decode(free[row, 11 + 4 : 11 + 6]) for row in range(2)]
    kwargs = dict(stop_strings=stops, tokenizer=tokenizer, max_new_tokens=12, **mode)
    expected = generate(model, input_ids, mask, **kwargs)
    assert expected.shape[1] < free.shape[1], "the stop string must end the call early"
    hf_paged.wrap(model, num_pages=128, page_size=4)
    assert torch.equal(generate(model, input_ids, mask, **kwargs), expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2)])
def test_prefill_chunk_size_gives_stocks_tokens(family, mode):
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=2, length=19, pads=(0, 6))
    kwargs = dict(prefill_chunk_size=4, **fixed_length(NEW), **mode)
    expected = generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=256, page_size=4)
    assert torch.equal(generate(model, input_ids, mask, **kwargs), expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_wrapped_assistant_model_gives_stock_tokens(family):
    """Assisted decoding with both the model and its assistant wrapped: transformers keeps the
    assistant's cache across its rounds (cropped back whenever the model rejects its tokens), so the
    assistant's rounds run the stock way; the model runs on its pages (Mistral: past its window)."""
    model, assistant = tiny_model(family), tiny_model(family, seed=1)
    input_ids, mask = padded_prompts(batch=1, length=15, pads=(0,))
    modes = [dict(), dict(do_sample=True)]
    kwargs = [dict(assistant_model=assistant, max_new_tokens=16, **mode) for mode in modes]
    expected = [generate(model, input_ids, mask, **kw) for kw in kwargs]
    hf_paged.wrap(model, num_pages=128, page_size=4)
    hf_paged.wrap(assistant, num_pages=128, page_size=4)
    for mode, kw, tokens in zip(modes, kwargs, expected):
        assert torch.equal(generate(model, input_ids, mask, **kw), tokens), mode
    assert hf_paged.memory_stats(model)["pages_in_use"] == hf_paged.memory_stats(assistant)["pages_in_use"] == 0
    assert hf_paged.memory_stats(model)["peak_pages_in_use"] > 0
    # Wrapped or not, the assistant generates stock's tokens on its own.
    input_ids, mask = padded_prompts(batch=2, length=15, pads=(0, 4))
    assert torch.equal(generate(assistant, input_ids, mask, **fixed_length(NEW)),
                       generate(tiny_model(family, seed=1), input_ids, mask, **fixed_length(NEW)))
