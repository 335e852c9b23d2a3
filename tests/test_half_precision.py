"""bf16 on CPU with the trained default model: hf_paged's tokens agree with stock's wherever the model
is not at a near-tie (tests/numerics.py token_agreement; the GPU tests judge FlashInfer the same way).

Random-weight models have flat distributions where rounding flips ties everywhere; a trained model's
are peaked, so these need the real one. fp32 parity (token for token) is tested on random models of
every family elsewhere.
"""

import pytest
import torch

import hf_paged

from numerics import default_model_and_prompts, token_agreement

NEW_TOKENS = 12


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "cascade"), [("greedy", None), ("beam", False), ("beam", True)])
def test_bf16_generate_agrees_with_stock_on_the_trained_model(mode, cascade):
    model, input_ids, mask = default_model_and_prompts(torch.device("cpu"), torch.bfloat16, batch=6)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, num_beams=4 if mode == "beam" else 1)
    stock = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=512, page_size=16, backend="torch", cascade=cascade)
    paged = model.generate(input_ids, **kwargs)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    hf_paged.unwrap(model)
    assert paged.shape == stock.shape
    agreement = token_agreement(stock, paged, model, mask, input_ids.shape[1], beams=mode == "beam")
    assert agreement >= 0.99, f"{mode}: {agreement:.3f} of tokens agree"
