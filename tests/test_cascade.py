"""Shared-prefix (cascade) attention: the same output as the plain path, the same tokens in generate().

Also the executor's unmasked causal path for fresh prompts (added with the cascade work).
"""

import dataclasses

import pytest
import torch

import hf_paged
import hf_paged.attention.torch as torch_executor
from hf_paged.attention import LayerParams, prefix
from hf_paged.attention.torch import cascade, dense, masks
from hf_paged.memory.blocks import BlockManager
from hf_paged.attention.metadata import build_metadata
from hf_paged.memory.tables import PageTables

from reference import HEAD_DIM, dense_from_pool, grouped_case
from tiny import padded_prompts, tiny_model

@pytest.fixture
def always_cascade(monkeypatch):
    """Take the cascade path whenever a shared prefix exists, however little it saves."""
    monkeypatch.setattr(prefix, "MIN_SAVED_FRACTION", 0.0)


CASES = [
    # page_size, parents' prefix lens, parent of each row, private lens, new lens
    (1, [7], [0, 0, 0, 0], [0, 2, 5, 1], [1, 1, 1, 1]),
    (8, [13, 40], [0, 0, 1, 1, 1], [3, 0, 9, 1, 4], [1, 1, 1, 1, 1]),
    (16, [17, 33, 16], [0, 0, 0, 1, 1, 2, 2, 2], [0, 4, 15, 1, 30, 2, 0, 17], [1, 1, 1, 1, 1, 1, 1, 1]),
    (16, [48, 5], [1, 0, 1, 0, 0], [3, 1, 2, 20, 0], [1, 1, 1, 1, 1]),  # interleaved groups + a short one
    (8, [24, 9], [0, 1, 0, 0], [5, 3, 1, 7], [3, 1, 2, 4]),  # several new tokens per row
    (1, [3, 11], [0, 0, 1], [0, 0, 0], [2, 1, 5]),
    (4, [8], [0, 0], [0, 0], [3, 3]),  # the suffix is only the new tokens: it still needs its causal mask
    # Prefixes of one length in consecutive pages: read in place, not gathered.
    (8, [16, 16], [0, 0, 1, 1], [3, 1, 0, 5], [1, 1, 1, 1]),
    (16, [40], [0, 0, 0, 0], [0, 2, 5, 1], [1, 1, 1, 1]),
    (4, [9, 10, 11], [0, 1, 2, 0, 1, 2], [1, 2, 3, 4, 5, 6], [2, 2, 2, 1, 1, 1]),
]
IN_PLACE_CASES = CASES[-3:]


@pytest.mark.parametrize("page_size,prefix_lens,fork,private_lens,new_lens", CASES)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(2, 2), (8, 2), (7, 1)])
@pytest.mark.parametrize("soft_cap", [0.0, 3.0])
def test_cascade_matches_plain_path(always_cascade, page_size, prefix_lens, fork, private_lens, new_lens,
                                    num_qo_heads, num_kv_heads, soft_cap):
    pool, meta, zero_page = grouped_case(page_size, prefix_lens, fork, private_lens, new_lens, num_kv_heads)
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.3, -1, soft_cap)
    q = torch.randn(sum(new_lens), num_qo_heads, HEAD_DIM, generator=torch.Generator().manual_seed(9))
    shared_plan = torch_executor.plan(meta, params, zero_page)
    assert isinstance(shared_plan, cascade.CascadePlan), "these rows share full pages: cascade must run"
    plain_plan = torch_executor.plan(dataclasses.replace(meta, cascade=False), params, zero_page)
    assert isinstance(plain_plan, dense.TorchPlan)
    expected = dense_from_pool(q, pool, meta, params)
    torch.testing.assert_close(torch_executor.run(q, pool, plain_plan), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_executor.run(q, pool, shared_plan), expected, rtol=1e-5, atol=1e-5)


def test_prefix_read_in_place_only_for_equal_consecutive_runs(always_cascade):
    params = LayerParams(8, 2, HEAD_DIM, 0.3)
    gathered = [CASES[1], CASES[2]]  # groups whose prefixes differ in length
    for case in IN_PLACE_CASES + gathered:
        _, meta, zero_page = grouped_case(*case, num_kv_heads=2)
        plan = torch_executor.plan(meta, params, zero_page)
        in_place = case in IN_PLACE_CASES
        assert (plan.prefix_run is not None) == in_place, case
        assert (plan.prefix_slots is None) == in_place, case


@pytest.mark.parametrize("private,takes_cascade", [(3, True), (4, False)])
def test_real_threshold_cascade_at_a_quarter_of_the_keys_saved(private, takes_cascade):
    """The default threshold, not the fixture's 0: two rows share one page (4 keys saved). With 3
    private tokens each the forward reads 2 * 8 = 16 keys (4 saved = exactly a quarter: cascade);
    with 4 it reads 18 (4 < 4.5: the plain path)."""
    pool, meta, zero_page = grouped_case(4, [4], [0, 0], [private, private], [1, 1], 2)
    assert prefix.find_groups(meta) == [([0, 1], 1)] and sum(meta.kv_lens) == 2 * (5 + private)
    params = LayerParams(4, 2, HEAD_DIM, 0.3)
    plan = torch_executor.plan(meta, params, zero_page)
    assert isinstance(plan, cascade.CascadePlan) == takes_cascade
    assert (prefix.shared_groups(meta, params) is not None) == takes_cascade  # FlashInfer asks the same


def test_groups_are_page_aligned_and_exclude_new_tokens():
    # Parent 0: 20 tokens at page size 8 -> 2 full pages shared; parent 1: 5 tokens, no full page.
    _, meta, _ = grouped_case(8, [20, 5], [0, 0, 0, 1, 1], [4, 0, 12, 3, 0], [1, 1, 1, 1, 1], 1)
    assert prefix.find_groups(meta) == [([0, 1, 2], 2)]
    # Row 1 holds exactly the 2 full pages plus its new token: the prefix stops before that token.
    _, meta, _ = grouped_case(8, [16], [0, 0], [0, 0], [1, 1], 1)
    assert prefix.find_groups(meta) == [([0, 1], 2)]
    # A shared, partly filled page is copied on write: only the full page before it is shared.
    _, meta, _ = grouped_case(8, [12], [0, 0], [0, 0], [3, 1], 1)
    assert prefix.find_groups(meta) == [([0, 1], 1)]


def test_plain_path_without_sharing_window_or_flag(always_cascade):
    pool, meta, zero_page = grouped_case(4, [9, 9], [0, 1], [2, 3], [1, 1], 2)
    params = LayerParams(4, 2, HEAD_DIM, 0.3)
    assert isinstance(torch_executor.plan(meta, params, zero_page), dense.TorchPlan), "no shared pages"
    pool, meta, zero_page = grouped_case(4, [9], [0, 0], [2, 3], [1, 1], 2)
    windowed = LayerParams(4, 2, HEAD_DIM, 0.3, window_left=3)
    assert isinstance(torch_executor.plan(meta, windowed, zero_page), dense.TorchPlan)
    off = dataclasses.replace(meta, cascade=False)
    assert isinstance(torch_executor.plan(off, params, zero_page), dense.TorchPlan)


@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(2, 2), (8, 2), (7, 1)])
def test_fresh_prompts_take_causal_path_equal_to_masked(page_size, num_qo_heads, num_kv_heads):
    """The executor's other shortcut: prompts with no past run unmasked causal SDPA."""
    pool, meta, zero_page = grouped_case(page_size, [0, 0, 0], [0, 1, 2], [0, 0, 0], [13, 13, 13], num_kv_heads)
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.3)
    plan = torch_executor.plan(meta, params, zero_page)
    assert plan.causal and plan.mask is None
    mask = masks.packed_mask(meta, 13, 13, params, packed=plan.packed)  # in the plan's query layout
    masked = dataclasses.replace(plan, causal=False, mask=mask)
    q = torch.randn(39, num_qo_heads, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    expected = dense_from_pool(q, pool, meta, params)
    torch.testing.assert_close(torch_executor.run(q, pool, plan), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_executor.run(q, pool, masked), expected, rtol=1e-5, atol=1e-5)
    padded = build_metadata(tables_with_past(page_size), [13, 13], 13, [], [], None,
                            torch.device("cpu"))
    assert not torch_executor.plan(padded, params, zero_page).causal, "rows with a past need the mask"


def tables_with_past(page_size):
    """Two rows, one with 3 tokens of past, each then given 13 new tokens."""
    tables = PageTables(BlockManager(64), page_size)
    tables.add_rows(2)
    tables.append([3, 0])
    tables.append([13, 13])
    return tables


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_partials_merge_in_float32_and_round_once(always_cascade, monkeypatch, dtype):
    """Issue 20: the two partial attentions reach the merge in float32, not rounded to half first."""
    page_size, prefix_lens, fork, private_lens, new_lens = CASES[2]
    pool, meta, zero_page = grouped_case(page_size, prefix_lens, fork, private_lens, new_lens, 2)
    params = LayerParams(8, 2, HEAD_DIM, 0.3, -1, 0.0)
    q = torch.randn(sum(new_lens), 8, HEAD_DIM, generator=torch.Generator().manual_seed(9)).to(dtype)
    half_pool = pool.to(dtype)
    seen = []
    real_merge = cascade.merge
    monkeypatch.setattr(cascade, "merge", lambda *a: seen.append((a[0].dtype, a[2].dtype)) or real_merge(*a))
    shared_plan = torch_executor.plan(meta, params, zero_page)
    assert isinstance(shared_plan, cascade.CascadePlan)
    out = torch_executor.run(q, half_pool, shared_plan)
    assert seen == [(torch.float32, torch.float32)] and out.dtype == dtype
    # float32 attention on the same (half-precision) values, rounded once: at most one rounding apart.
    plain_plan = torch_executor.plan(dataclasses.replace(meta, cascade=False), params, zero_page)
    expected = torch_executor.run(q.float(), half_pool.float(), plain_plan).to(dtype)
    torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=1e-3)


def test_merge_of_split_softmax_equals_softmax():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 12, generator=generator)
    values = torch.randn(12, 4, generator=generator)
    parts = []
    for keys in (slice(0, 7), slice(7, 12)):
        part = scores[:, keys]
        parts.append((part.softmax(-1) @ values[keys], torch.logsumexp(part, -1)))
    (out_a, lse_a), (out_b, lse_b) = parts
    torch.testing.assert_close(cascade.merge(out_a, lse_a, out_b, lse_b), scores.softmax(-1) @ values)
    empty = torch.full_like(lse_a, float("-inf"))
    torch.testing.assert_close(cascade.merge(torch.zeros_like(out_a), empty, out_b, lse_b), out_b)


def _generate(model, cascade_on: bool, **kwargs):
    hf_paged.wrap(model, page_size=4, num_pages=512, cascade=cascade_on)
    torch.manual_seed(0)
    out = model.generate(**kwargs)
    hf_paged.unwrap(model)
    return out


@pytest.mark.parametrize(
    "decoding",
    [
        dict(num_beams=4, do_sample=False),
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, num_return_sequences=3),
    ],
    ids=["beams", "beams-return-2", "sampling"],
)
def test_generate_same_tokens_with_and_without_cascade(always_cascade, monkeypatch, decoding):
    model = tiny_model("llama")
    input_ids, attention_mask = padded_prompts(batch=2, length=14, pads=(0, 5))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=9, min_new_tokens=9,
                  pad_token_id=0, **decoding)
    calls = []
    real_run = cascade.run
    monkeypatch.setattr(cascade, "run", lambda *a: calls.append(1) or real_run(*a))
    with_cascade = _generate(model, True, **kwargs)
    assert calls, "the cascade path never ran"
    calls.clear()
    without = _generate(model, False, **kwargs)
    assert not calls
    assert torch.equal(with_cascade, without)
    torch.manual_seed(0)
    assert torch.equal(with_cascade, model.generate(**kwargs)), "unwrapped (stock) generate() differs"


def test_prefix_ending_in_a_copied_page_is_cut_to_its_consecutive_run(always_cascade):
    """Beams of two prompts whose shared prefix ends in a copy-on-write page (as after the prompt's
    partly filled last page is written): the prefixes are cut to their consecutive pages, read in
    place, and the copied page joins each row's suffix."""
    page_size, num_pages = 4, 64
    generator = torch.Generator().manual_seed(3)
    pool = torch.randn(2, num_pages + 1, page_size, 2, HEAD_DIM, generator=generator)
    pool[:, num_pages].zero_()
    tables = PageTables(BlockManager(num_pages), page_size)
    tables.add_rows(2)
    tables.append([15, 15])  # pages 0-3 and 4-7
    tables.select_rows([0, 0, 1, 1])
    tables.append([1, 1, 1, 1])  # rows 0 and 2 copy the shared partial page: 8 and 9
    tables.select_rows([0, 0, 2, 2])
    slots, copies = tables.append([1, 1, 1, 1])
    assert [t[:4] for t in tables.page_tables] == [[0, 1, 2, 8], [0, 1, 2, 8], [4, 5, 6, 9], [4, 5, 6, 9]]
    meta = build_metadata(tables, [1, 1, 1, 1], 1, slots, copies, None, torch.device("cpu"), cascade=True)
    assert prefix.find_groups(meta) == [([0, 1], 4), ([2, 3], 4)]
    params = LayerParams(8, 2, HEAD_DIM, 0.3)
    plan = torch_executor.plan(meta, params, num_pages)
    assert plan.prefix_run == (0, 4) and plan.max_prefix == 3 * page_size
    q = torch.randn(4, 8, HEAD_DIM, generator=generator)
    plain = torch_executor.plan(dataclasses.replace(meta, cascade=False), params, num_pages)
    torch.testing.assert_close(torch_executor.run(q, pool, plan), torch_executor.run(q, pool, plain), rtol=1e-5, atol=1e-5)
