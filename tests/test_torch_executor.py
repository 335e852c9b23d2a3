"""The torch executor against dense attention, over awkward lengths, page sizes, GQA and sharing."""

import dataclasses

import pytest
import torch

from hf_paged.attention import LayerParams
from hf_paged.attention.torch import dense as torch_dense, masks as torch_masks

from reference import HEAD_DIM, PAGED_CASES, dense_layer, paged_case, reserved_case

@pytest.mark.parametrize("page_size,past_lens,new_lens,shared_prefix", PAGED_CASES)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(2, 2), (8, 2), (7, 1)])
@pytest.mark.parametrize("window_left,soft_cap", [(-1, 0.0), (4, 0.0), (-1, 3.0)])
def test_matches_dense_attention(page_size, past_lens, new_lens, shared_prefix, num_qo_heads, num_kv_heads, window_left, soft_cap):
    pool, meta, dense, zero_page = paged_case(page_size, past_lens, new_lens, shared_prefix, num_kv_heads)
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.3, window_left, soft_cap)
    q = torch.randn(sum(new_lens), num_qo_heads, HEAD_DIM, generator=torch.Generator().manual_seed(9))
    out = torch_dense.run(q, pool, torch_dense.plan(meta, params, zero_page))
    start = 0
    for row, n in enumerate(new_lens):
        expected = dense_layer(q[start : start + n], dense[row][0], dense[row][1], params)
        torch.testing.assert_close(out[start : start + n], expected, rtol=1e-5, atol=1e-5)
        start += n


def test_metadata_is_in_flashinfer_format():
    pool, meta, dense, _ = paged_case(4, [6, 9], [2, 1], 4, 1)
    for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
        assert getattr(meta, name).dtype == torch.int32, name
    assert meta.qo_indptr.tolist() == [0, 2, 3]
    assert meta.kv_lens == [8, 10]
    assert meta.kv_indptr.tolist() == [0, 2, 5]
    assert meta.kv_indices[0].item() == meta.kv_indices[2].item(), "the full prefix page is shared"
    assert meta.kv_last_page_len.tolist() == [4, 2]
    assert torch.equal(torch_masks.kv_lengths(meta), torch.tensor([8, 10]))


# -- rows in consecutive pages: read as a view of the pool, no gather -----------------------------


@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize(
    "steps",
    [
        [[5, 5, 5]],  # a prompt: causal, nothing past
        [[9, 9], [1, 1]],  # a decode step
        [[16, 16, 16, 16], [3, 3, 3, 3]],  # several new tokens on top of full pages
        [[7, 7, 7], [1, 1, 1], [1, 1, 1]],
    ],
)
@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("window_left, soft_cap", [(-1, 0.0), (3, 0.0), (-1, 5.0)])
def test_rows_read_in_place_match_dense_attention(page_size, steps, num_qo_heads, num_kv_heads, window_left, soft_cap):
    reserve = sum(step[0] for step in steps) + page_size + 1  # some room left in each run
    pool, meta, dense, zero_page = reserved_case(page_size, steps, len(steps[0]), num_kv_heads, reserve)
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.4, window_left, soft_cap)
    plan = torch_dense.plan(meta, params, zero_page)
    assert plan.row_run is not None and plan.kv_slots is None  # nothing is gathered
    q = torch.randn(sum(meta.qo_lens), num_qo_heads, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    out = torch_dense.run(q, pool, plan)
    assert not out.isnan().any()  # the NaN slots past every row's tokens are never read
    start = 0
    for row, n in enumerate(meta.qo_lens):
        expected = dense_layer(q[start : start + n], *dense[row], params)
        torch.testing.assert_close(out[start : start + n], expected, atol=1e-5, rtol=1e-5)
        start += n
    gathered = torch_dense.plan(dataclasses.replace(meta, kv_indices_host=None, made_kv_indices=meta.kv_indices), params, zero_page)
    assert gathered.kv_slots is not None
    torch.testing.assert_close(out, torch_dense.run(q, pool, gathered), atol=1e-6, rtol=1e-6)


def test_rows_of_unequal_length_are_gathered_even_in_consecutive_pages():
    pool, meta, dense, zero_page = reserved_case(4, [[6, 3], [1, 1]], 2, 2, 16)
    assert meta.kv_lens == [7, 4]
    params = LayerParams(2, 2, HEAD_DIM, 0.4)
    plan = torch_dense.plan(meta, params, zero_page)
    assert plan.row_run is None and plan.kv_slots is not None
    q = torch.randn(2, 2, HEAD_DIM)
    out = torch_dense.run(q, pool, plan)
    for row in range(2):
        torch.testing.assert_close(out[row : row + 1], dense_layer(q[row : row + 1], *dense[row], params), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_size, past_len, new_len, shared_prefix", [(4, 9, 1, 4), (4, 8, 1, 8), (1, 5, 2, 3), (8, 13, 3, 8)])
@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("window_left", [-1, 3])
def test_rows_of_equal_length_in_scattered_pages_are_gathered_by_whole_pages(
    page_size, past_len, new_len, shared_prefix, num_qo_heads, num_kv_heads, window_left
):
    """Rows that share a prefix (sampling, beams) hold the same number of tokens but not one strided
    run of pages: the plan gathers whole pages (one index per page, not per token). Every slot that
    holds no token of some row is NaN, so reading one would show."""
    rows = 3
    pool, meta, dense, zero_page = paged_case(page_size, [past_len] * rows, [new_len] * rows, shared_prefix, num_kv_heads)
    held = torch.zeros(pool.shape[1] * page_size, dtype=torch.bool)
    for row in range(rows):
        pages = meta.kv_indices_host[meta.kv_indptr_host[row] : meta.kv_indptr_host[row + 1]]
        held[[pages[t // page_size] * page_size + t % page_size for t in range(meta.kv_lens[row])]] = True
    pool.view(2, -1, num_kv_heads, HEAD_DIM)[:, ~held] = float("nan")
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.4, window_left)
    plan = torch_dense.plan(meta, params, zero_page)
    assert plan.row_run is None and plan.kv_slots is None
    assert plan.kv_pages.numel() == 2 * rows * -(-(past_len + new_len) // page_size)
    q = torch.randn(rows * new_len, num_qo_heads, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    out = torch_dense.run(q, pool, plan)
    assert not out.isnan().any()
    for row in range(rows):
        rows_q = q[row * new_len : (row + 1) * new_len]
        expected = dense_layer(rows_q, *dense[row], params)
        torch.testing.assert_close(out[row * new_len : (row + 1) * new_len], expected, atol=1e-5, rtol=1e-5)


# -- a decode step on the pages of the step before: the plan is carried over ----------------------


@pytest.mark.parametrize("reserve", [True, False])  # rows in consecutive pages (views), or scattered (page gather)
@pytest.mark.parametrize("window_left", [-1, 3])
@pytest.mark.parametrize("num_qo_heads", [2, 8])
def test_a_decode_plan_carried_over_to_the_next_step_reads_what_a_new_plan_reads(reserve, window_left, num_qo_heads):
    from hf_paged.memory.blocks import BlockManager
    from hf_paged.attention.metadata import advance_metadata, build_metadata
    from hf_paged.attention import ops
    from hf_paged.memory.tables import PageTables

    page_size, num_pages, rows, num_kv_heads = 8, 32, 2, 2
    generator = torch.Generator().manual_seed(3)
    pool = torch.full((2, num_pages + 1, page_size, num_kv_heads, HEAD_DIM), float("nan"))
    pool[:, num_pages].zero_()
    tables = PageTables(BlockManager(num_pages), page_size)
    tables.add_rows(rows)
    if reserve:
        assert tables.reserve(32)

    def write(slots):
        k, v = (torch.randn(len(slots), num_kv_heads, HEAD_DIM, generator=generator) for _ in range(2))
        ops.write_kv_auto(pool, k, v, torch.tensor(slots))

    for step in ([5, 5], [4, 4], [1, 1]):  # the prompt, then a step that takes a new page in each row
        slots, _ = tables.append(step)
        write(slots)
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.4, window_left)
    meta = build_metadata(tables, [1, 1], 1, slots, [], None, torch.device("cpu"))
    plan = torch_dense.plan(meta, params, num_pages)
    assert (plan.row_run is not None) == reserve and plan.decode_view is not None
    for _ in range(6):  # tokens 11..16 of each row fit in its last page: no page changes
        slots = tables.in_place_slots([1, 1])
        assert slots is not None
        tables.advance([1, 1])
        write(slots)
        meta = advance_metadata(meta, [1, 1], 1, slots)
        plan = torch_dense.advance_plan(plan, meta)
        fresh = torch_dense.plan(build_metadata(tables, [1, 1], 1, slots, [], None, torch.device("cpu")), params, num_pages)
        assert plan.trim == fresh.trim and plan.decode_view == fresh.decode_view and plan.max_kv == fresh.max_kv
        q = torch.randn(rows, num_qo_heads, HEAD_DIM, generator=generator)
        out = torch_dense.run(q, pool, plan)
        assert not out.isnan().any()
        torch.testing.assert_close(out, torch_dense.run(q, pool, fresh), atol=0, rtol=0)
    assert tables.in_place_slots([1, 1]) is None  # the last pages are full: the next token takes a page
