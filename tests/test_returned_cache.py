"""A cache returned by generate() stays usable, as stock's (issue 30, point 2): passing it back
continues with stock's tokens; it holds its pages until dropped or released; memory_stats() counts them."""

import copy
import gc

import pytest
import torch

import hf_paged
from tiny import fixed_length, padded_prompts, tiny_model


def _turn(model, input_ids, mask, cache=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    if cache is not None:
        kwargs["past_key_values"] = cache
    return model.generate(
        input_ids, attention_mask=mask, pad_token_id=0, return_dict_in_generate=True, **fixed_length(5), **kwargs
    )


def _next_prompt(sequences, mask, turn: int):
    """The conversation so far and a new user turn of 4 tokens."""
    user = torch.randint(3, 100, (sequences.shape[0], 4), generator=torch.Generator().manual_seed(turn))
    input_ids = torch.cat([sequences, user], dim=1)
    return input_ids, torch.cat([mask, torch.ones(mask.shape[0], input_ids.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)


def _first_turn_and_next_prompt(model, input_ids, mask):
    """A first turn, then the conversation so far plus a new user turn, with the prompt's padding kept."""
    first = _turn(model, input_ids, mask)
    ids, new_mask = _next_prompt(first.sequences, torch.ones_like(first.sequences), 0)
    new_mask[:, : mask.shape[1]] = mask
    return first, ids, new_mask


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("kwargs", [dict(), dict(do_sample=True, top_k=20)], ids=["greedy", "sample"])
def test_a_three_turn_chat_continues_from_returned_caches(family, kwargs):
    stock = tiny_model(family)
    paged = hf_paged.wrap(copy.deepcopy(stock), num_pages=256, page_size=4)
    input_ids, mask = padded_prompts()
    stock_cache = paged_cache = None
    for turn in range(3):
        expected = _turn(stock, input_ids, mask, stock_cache, seed=turn, **kwargs)
        got = _turn(paged, input_ids, mask, paged_cache, seed=turn, **kwargs)
        assert torch.equal(got.sequences, expected.sequences), turn
        stock_cache, paged_cache = expected.past_key_values, got.past_key_values
        assert isinstance(paged_cache, hf_paged.PagedCache) and paged_cache.get_seq_length() == stock_cache.get_seq_length()
        stats = hf_paged.memory_stats(paged)
        assert stats["returned_caches"] == 1 and stats["returned_cache_pages"] == stats["pages_in_use"] > 0
        input_ids, mask = _next_prompt(got.sequences, torch.cat([mask, torch.ones_like(got.sequences[:, mask.shape[1]:])], 1), turn)
    del got, paged_cache
    gc.collect()
    stats = hf_paged.memory_stats(paged)
    assert stats["pages_in_use"] == 0 and stats["returned_caches"] == 0  # dropping it returns every page


def test_release_gives_the_pages_back_and_a_plain_output_keeps_no_cache():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    input_ids, mask = padded_prompts()
    out = _turn(model, input_ids, mask)
    assert hf_paged.memory_stats(model)["pages_in_use"] > 0
    out.past_key_values.release()
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0 == hf_paged.memory_stats(model)["returned_caches"]
    model.generate(input_ids, attention_mask=mask, pad_token_id=0, **fixed_length(3))  # a tensor: no cache kept
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_continuing_from_inputs_embeds():
    stock = tiny_model("llama")
    paged = hf_paged.wrap(copy.deepcopy(stock), num_pages=64, page_size=4)
    input_ids, mask = padded_prompts()
    results = []
    for model in (stock, paged):
        first, ids, new_mask = _first_turn_and_next_prompt(model, input_ids, mask)
        embeds = model.get_input_embeddings()(ids)
        second = model.generate(
            inputs_embeds=embeds, attention_mask=new_mask, past_key_values=first.past_key_values, pad_token_id=0,
            **fixed_length(4),
        )
        results.append(second)
    assert torch.equal(results[1], results[0])


def test_beam_search_cache_continues_with_the_same_num_beams_and_says_so_otherwise():
    stock = tiny_model("llama")
    paged = hf_paged.wrap(copy.deepcopy(stock), num_pages=256, page_size=4)
    input_ids, mask = padded_prompts()
    results = []
    for model in (stock, paged):
        first = _turn(model, input_ids, mask, num_beams=3)
        ids, new_mask = _next_prompt(first.sequences, torch.ones_like(first.sequences), 0)
        new_mask[:, : mask.shape[1]] = mask
        results.append(_turn(model, ids, new_mask, first.past_key_values, num_beams=3).sequences)
    assert torch.equal(results[1], results[0])
    first = _turn(paged, input_ids, mask, num_beams=3)
    ids, new_mask = _next_prompt(first.sequences, torch.ones_like(first.sequences), 0)
    with pytest.raises(ValueError, match="returned by a beam search with num_beams=3.*continue it with num_beams=3"):
        _turn(paged, ids, torch.ones_like(ids), first.past_key_values)


def test_a_deep_copy_of_a_returned_cache_continues_as_stocks_does():
    """transformers' tests continue from `copy.deepcopy(out.past_key_values)`: the copy shares every
    page (copy-on-write), both continue with stock's tokens, and dropping both returns every page."""
    stock = tiny_model("llama")
    paged = hf_paged.wrap(copy.deepcopy(stock), num_pages=128, page_size=4)
    input_ids, mask = padded_prompts()
    results = []
    for model in (stock, paged):
        first, ids, new_mask = _first_turn_and_next_prompt(model, input_ids, mask)
        copied = copy.deepcopy(first.past_key_values)
        results.append([_turn(model, ids, new_mask, cache).sequences for cache in (copied, first.past_key_values)])
        del first, copied
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])
    gc.collect()
    assert hf_paged.memory_stats(paged)["pages_in_use"] == 0


def test_an_encoder_decoder_cache_is_released_and_says_so():
    """Not yet served: continuing from an encoder-decoder model's returned cache (its cross-attention pages)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = hf_paged.wrap(transformers.AutoModelForSeq2SeqLM.from_config(config).eval(), num_pages=64, page_size=4)
    input_ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids, max_new_tokens=3, return_dict_in_generate=True)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    with pytest.raises(RuntimeError, match="encoder-decoder PagedCache was released.*new generate"):
        model.generate(input_ids, decoder_input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2)
