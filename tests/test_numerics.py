"""The GPU tests' judgements (tests/numerics.py) on CPU: they pass a correct 16-bit computation and
fail a deliberately wrong one, so a GPU run that passes them says something.

The "kernel" here is the torch executor in bfloat16, run once as it is and once on metadata or a
pool with one key dropped or duplicated.
"""

import dataclasses

import pytest
import torch

from hf_paged.attention import TorchExecutor
from hf_paged.config import PagedConfig
from hf_paged.memory.pool import KVPool, LayerSpec

import numerics
from numerics import CASES, assert_matches_reference, build_forward, layer_params, reference_output, token_agreement
from tiny import fixed_length, generate, padded_prompts, tiny_model

DTYPE = torch.bfloat16
PAGE_SIZE = 16


def forward(case: str, variant: str, seed: int = 3):
    """(pool, metadata, params, q) of one GPU test case on CPU in bfloat16, GQA group 4, head dim 128."""
    pool = KVPool(PagedConfig(page_size=PAGE_SIZE, num_pages=4096 // PAGE_SIZE + 64, backend="torch"),
                  [LayerSpec(2, 128, torch.device("cpu"), DTYPE)])
    history, qo_lens, fork = CASES[case]
    meta, _ = build_forward(pool, history, qo_lens, fork, seed=seed)
    params = layer_params(8, 2, 128, variant)
    q = torch.randn(sum(qo_lens), 8, 128, generator=torch.Generator().manual_seed(seed)).to(DTYPE)
    return pool, meta, params, q


def run(pool, meta, params, q) -> torch.Tensor:
    executor = TorchExecutor()
    return executor.run(q, pool.pools[0], executor.plan(meta, params, pool))


def without_last_key(meta, row: int):
    """The metadata with row `row`'s last key left out (its last page keeps one slot fewer)."""
    last = meta.kv_last_page_len.clone()
    assert int(last[row]) > 1, "pick a row whose last page holds more than one token"
    last[row] -= 1
    kv_lens = list(meta.kv_lens)
    kv_lens[row] -= 1
    return dataclasses.replace(meta, made_kv_last_page_len=last, kv_lens=kv_lens)


def with_a_duplicated_key(pool, meta, row: int, key: int):
    """The metadata with row `row` one token longer, that token a copy of its key `key` (the pool is
    written: the copy goes to the next free slot of the row's last page)."""
    pages = meta.kv_indices_host[meta.kv_indptr_host[row] : meta.kv_indptr_host[row + 1]]
    used = int(meta.kv_last_page_len[row])
    assert used < PAGE_SIZE, "pick a row whose last page has a free slot"
    layer = pool.pools[0]
    layer[:, pages[-1], used] = layer[:, pages[key // PAGE_SIZE], key % PAGE_SIZE]
    last = meta.kv_last_page_len.clone()
    last[row] += 1
    kv_lens = list(meta.kv_lens)
    kv_lens[row] += 1
    return dataclasses.replace(meta, made_kv_last_page_len=last, kv_lens=kv_lens)


@pytest.mark.parametrize("variant", sorted(numerics.VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_correct_16_bit_computation_passes(case, variant):
    pool, meta, params, q = forward(case, variant)
    assert_matches_reference(run(pool, meta, params, q), reference_output(q, pool, meta, params), f"{case} {variant}")


def test_one_key_dropped_or_duplicated_in_a_thousand_fails():
    """Row 5 of "decode" holds 1001 tokens: one key of roughly equal weight moves its output by about
    1/sqrt(1001) of its norm, which the old absolute tolerance (2e-2) let through."""
    pool, meta, params, q = forward("decode", "plain")
    assert meta.kv_lens[5] == 1001
    expected = reference_output(q, pool, meta, params)
    dropped = run(pool, without_last_key(meta, 5), params, q)
    torch.testing.assert_close(dropped.double(), expected, atol=2e-2, rtol=2e-2)  # the old check passes it
    with pytest.raises(AssertionError, match="at token 5"):
        assert_matches_reference(dropped, expected)
    duplicated = run(pool, with_a_duplicated_key(pool, meta, 5, key=400), params, q)
    with pytest.raises(AssertionError, match="at token 5"):
        assert_matches_reference(duplicated, expected)


def test_a_dropped_dominant_key_fails_by_far():
    """Peaked scores, each decode query equal to its own newest key (as a token often attends most to
    itself): dropping that key moves the output by about its whole norm."""
    pool, meta, params, q = forward("decode", "peaked")
    pages, last = meta.kv_indices_host, meta.kv_last_page_len.tolist()
    for row in range(meta.num_rows):
        newest = pool.pools[0][0, pages[meta.kv_indptr_host[row + 1] - 1], last[row] - 1]  # [H_kv, D]
        q[row] = newest.repeat_interleave(4, dim=0)
    expected = reference_output(q, pool, meta, params)
    assert_matches_reference(run(pool, meta, params, q), expected)
    errors = numerics.relative_errors(run(pool, without_last_key(meta, 5), params, q), expected)
    assert float(errors[5].min()) > 0.5


# -- token agreement ------------------------------------------------------------------------------

NEW = 12


@pytest.fixture(scope="module")
def greedy_run():
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    stock = generate(model, input_ids, mask, **fixed_length(NEW))
    return model, input_ids, mask, stock


def continue_greedily(model, sequence: torch.Tensor, mask, length: int) -> torch.Tensor:
    """`sequence` [rows, L] extended greedily (stock, fp32) to `length` tokens."""
    full_mask = torch.cat([mask, torch.ones_like(sequence[:, mask.shape[1]:])], dim=1)
    new = length - sequence.shape[1]
    return generate(model, sequence, full_mask, **fixed_length(new)) if new else sequence


def least_likely(logp: torch.Tensor) -> int:
    """The least likely token of log-probs [vocab], EOS (left out: -inf) excepted."""
    return int(logp.masked_fill(logp.isinf(), float("inf")).argmin())


def test_stock_tokens_agree_fully(greedy_run):
    model, input_ids, mask, stock = greedy_run
    assert token_agreement(stock, stock, model, mask, input_ids.shape[1], beams=False) == 1.0
    assert token_agreement(stock, stock, model, mask, input_ids.shape[1], beams=True) == 1.0


def test_a_token_the_model_does_not_prefer_disagrees_and_nothing_after_a_tie_is_forgiven(greedy_run, monkeypatch):
    model, input_ids, mask, stock = greedy_run
    prompt_len, total = input_ids.shape[1], stock[:, input_ids.shape[1]:].numel()
    logp = numerics.log_probs(model, stock, mask, prompt_len)
    # Row 0's smallest top-2 margin: call it a tie, and swap in the runner-up there.
    top2 = logp[0].topk(2, dim=-1)
    margins = top2.values[:, 0] - top2.values[:, 1]
    step = int(margins[: NEW - 2].argmin())  # leave tokens after it
    monkeypatch.setattr(numerics, "GREEDY_TIE_NATS", float(margins[step]) + 1e-4)
    swapped = stock[:, : prompt_len + step + 1].clone()
    swapped[0, -1] = top2.indices[step, 1]
    tie = continue_greedily(model, swapped, mask, stock.shape[1])
    assert token_agreement(stock, tie, model, mask, prompt_len, beams=False) == 1.0  # a tie, then the model's choices
    # After the tie, the model's least likely token at each step: each disagrees (the old helper
    # counted the whole row as agreeing once its first difference was a tie).
    garbage = tie.clone()
    for position in range(step + 1, NEW):
        garbage[0, prompt_len + position] = least_likely(numerics.log_probs(model, garbage, mask, prompt_len)[0, position])
    agreement = token_agreement(stock, garbage, model, mask, prompt_len, beams=False)
    assert agreement == 1 - (NEW - step - 1) / total
    # One wrong last token: only it disagrees.
    wrong = stock.clone()
    wrong[1, -1] = least_likely(logp[1, -1])
    assert token_agreement(stock, wrong, model, mask, prompt_len, beams=False) == 1 - 1 / total


def test_a_beam_row_that_scores_worse_than_stock_disagrees_from_its_first_difference(greedy_run):
    model, input_ids, mask, stock = greedy_run
    prompt_len, total = input_ids.shape[1], stock[:, input_ids.shape[1]:].numel()
    logp = numerics.log_probs(model, stock, mask, prompt_len)
    worse = stock.clone()
    worse[0, prompt_len + 4] = least_likely(logp[0, 4])
    assert token_agreement(stock, worse, model, mask, prompt_len, beams=True) == 1 - (NEW - 4) / total
