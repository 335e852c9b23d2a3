"""`generate(..., cache_implementation="paged")` runs transformers' continuous batching, on its own
paged cache and an attention implementation it picks from the model's: on a wrapped model it gives
stock's tokens, and the model is wrapped as before when it returns."""

import copy

import pytest
import torch
from transformers import ContinuousBatchingConfig

import hf_paged

from tiny import tiny_model


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_continuous_batching_gives_stocks_tokens_and_leaves_the_model_wrapped(implementation):
    stock = tiny_model("llama")
    stock.set_attn_implementation(implementation)
    wrapped = hf_paged.wrap(copy.deepcopy(stock), num_pages=64, page_size=4)
    input_ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    # A small cache and no warm-up (CUDA graphs): the defaults size for a GPU and take 30 s on a CPU.
    batching = dict(cache_implementation="paged", warmup=False,
                    continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64))
    expected = stock.generate(input_ids, **batching, **kwargs)
    got = wrapped.generate(input_ids, **batching, **kwargs)
    assert torch.equal(got, expected)

    assert wrapped.config._attn_implementation == "hf_paged"
    assert wrapped.hf_paged_runtime.original_attn_implementation == implementation
    out = wrapped.generate(input_ids, num_beams=2, return_dict_in_generate=True, **kwargs)
    assert isinstance(out.past_key_values, hf_paged.PagedCache)  # the pages serve generate() again
    assert torch.equal(out.sequences, stock.generate(input_ids, num_beams=2, **kwargs))
    out.past_key_values.release()
    assert hf_paged.memory_stats(wrapped)["pages_in_use"] == 0
