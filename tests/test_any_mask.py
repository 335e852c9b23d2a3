"""Any 2-D attention mask (left, right, holes) gives stock's tokens, fp32 CPU (issue 30, point 1).

Pads are never stored; a forward whose padding paged attention cannot express runs dense
(hf_paged/cache/dense.py): right padding's pad queries, holes inside a sliding window, ALiBi over
padded positions (MPT). ALiBi families count positions over stored tokens (Bloom) or padded ones
(MPT): both are compared with stock here.
"""

import copy

import pytest
import torch

import hf_paged
from hf_paged import PagedCache
from tiny import MODES, fixed_length, generate, padded_prompts, tiny_model


def mixed_masks(batch: int = 3, length: int = 12):
    """Row 0 left-padded, row 1 right-padded, row 2 with a hole (and a left pad)."""
    input_ids, mask = padded_prompts(batch=batch, length=length, pads=(0,) * batch)
    input_ids[0, :2], mask[0, :2] = 0, 0
    input_ids[1, -3:], mask[1, -3:] = 0, 0
    input_ids[2, :1], mask[2, :1] = 0, 0
    input_ids[2, 5:7], mask[2, 5:7] = 0, 0
    return input_ids, mask


def _both(family: str):
    stock = tiny_model(family)
    return stock, hf_paged.wrap(copy.deepcopy(stock), num_pages=256, page_size=4)


def _same(stock, paged, input_ids, mask, **kwargs):
    # use_cache=True: MPT's config turns the cache off by default.
    kwargs = {**fixed_length(8), "return_dict_in_generate": True, "output_scores": True, "use_cache": True, **kwargs}
    expected, got = generate(stock, input_ids, mask, **kwargs), generate(paged, input_ids, mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(expected.scores, got.scores):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    if got.past_key_values is not None:  # returned by generate(): it holds its pages until released
        got.past_key_values.release()
    assert hf_paged.memory_stats(paged)["pages_in_use"] == 0


# Llama (full attention), Mistral and Gemma 2 (sliding windows of 5 the rows outgrow: holes inside
# windows), GPT-2, Bloom and MPT (ALiBi over stored / padded positions, patched attention).
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2", "bloom", "mpt"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "beam_sample"])
def test_right_padding_and_holes_give_stocks_tokens(family, mode):
    stock, paged = _both(family)
    _same(stock, paged, *mixed_masks(), **MODES[mode])


def tril_masks(batch: int = 2, length: int = 7):
    """The masks transformers' model testers build, `torch.tril(torch.ones_like(input_ids))`: row i
    holds i + 1 real tokens, then pads. The last prompt query of a sliding layer then sees no real
    key, and stock attends it uniformly to every key of the prompt's forward, pads included."""
    input_ids, _ = padded_prompts(batch=batch, length=length, pads=(0,) * batch)
    return input_ids, torch.tril(torch.ones_like(input_ids))


# Moshi: a window that is only its cache's (stock's DynamicCache(config) keeps the last 3 tokens).
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2", "moshi"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "beam_sample"])
def test_the_testers_tril_masks_give_stocks_tokens(family, mode):
    stock, paged = _both(family)
    _same(stock, paged, *tril_masks(), **MODES[mode])


@pytest.mark.parametrize("family", ["llama", "mistral", "bloom"])
def test_assisted_decoding_on_a_right_padded_prompt(family):
    stock, paged = _both(family)
    input_ids, mask = mixed_masks()
    _same(stock, paged, input_ids[1:2], mask[1:2], assistant_model=tiny_model(family, seed=1))


def test_a_mask_inferred_from_right_pad_tokens():
    """No attention_mask: generate() infers one from the pad tokens, pads at the end of row 1."""
    stock, paged = _both("llama")
    input_ids, _ = mixed_masks()
    expected = stock.generate(input_ids, pad_token_id=0, **fixed_length(6))
    assert torch.equal(paged.generate(input_ids, pad_token_id=0, **fixed_length(6)), expected)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_masked_tokens_take_no_page_and_are_never_attended(family):
    """A forward of your own: the cache stores only the mask's real tokens, and changing what sits
    at a masked position (its token id) changes no logit of a real position."""
    stock, paged = _both(family)
    input_ids, mask = mixed_masks()
    with torch.no_grad():
        expected = stock(input_ids, attention_mask=mask).logits
        other = input_ids.masked_fill(mask == 0, 77)
        with PagedCache(paged) as cache:
            logits = paged(input_ids, attention_mask=mask, past_key_values=cache).logits
            assert cache.tables.num_tokens == mask.sum(dim=1).tolist()
        with PagedCache(paged) as cache:
            other_logits = paged(other, attention_mask=mask, past_key_values=cache).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_logits[real], logits[real], rtol=0, atol=0)
