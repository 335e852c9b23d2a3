"""ALiBi in the torch executor and the paged_attention custom op, against dense attention."""

import pytest
import torch

from hf_paged.attention import LayerParams, ops
from hf_paged.attention.torch import dense as torch_backend

from reference import HEAD_DIM, PAGED_CASES, dense_layer, paged_case, reserved_case
from tiny import CountingBackend, padded_prompts, tiny_model


def slopes(num_heads: int) -> tuple[float, ...]:
    return tuple(2.0 ** (-(i + 1) * 0.7) for i in range(num_heads))  # distinct per head, not FlashInfer's


def check_rows(out, q, meta, dense, params):
    start = 0
    for row, n in enumerate(meta.qo_lens):
        expected = dense_layer(q[start : start + n], *dense[row], params)
        torch.testing.assert_close(out[start : start + n], expected, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("page_size,past_lens,new_lens,shared_prefix", PAGED_CASES)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("window_left", [-1, 4])
def test_alibi_matches_dense_attention(page_size, past_lens, new_lens, shared_prefix, num_qo_heads, num_kv_heads, window_left):
    pool, meta, dense, zero_page = paged_case(page_size, past_lens, new_lens, shared_prefix, num_kv_heads)
    meta.cascade = True  # rows share a prefix: ALiBi must still take the plain path
    params = LayerParams(num_qo_heads, num_kv_heads, HEAD_DIM, 0.3, window_left, alibi_slopes=slopes(num_qo_heads))
    q = torch.randn(sum(new_lens), num_qo_heads, HEAD_DIM, generator=torch.Generator().manual_seed(9))
    plan = torch_backend.plan(meta, params, zero_page)
    assert isinstance(plan, torch_backend.TorchPlan)
    check_rows(torch_backend.run(q, pool, plan), q, meta, dense, params)
    # The custom op (compiled decode steps) takes the same slopes as a list of floats.
    out = torch.ops.hf_paged.paged_attention(
        q, pool, meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, meta.max_qo_len,
        meta.max_kv_len + 3, 0.3, window_left, 0.0, "torch", list(params.alibi_slopes),
    )
    check_rows(out, q, meta, dense, params)


@pytest.mark.parametrize("steps", [[[5, 5, 5]], [[9, 9], [1, 1]]])
def test_alibi_on_rows_read_in_place(steps):
    pool, meta, dense, zero_page = reserved_case(4, steps, len(steps[0]), 2, 32)
    params = LayerParams(4, 2, HEAD_DIM, 0.4, alibi_slopes=slopes(4))
    plan = torch_backend.plan(meta, params, zero_page)
    assert plan.row_run is not None and not plan.causal  # the prompt step must not take SDPA's causal path
    q = torch.randn(sum(meta.qo_lens), 4, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    check_rows(torch_backend.run(q, pool, plan), q, meta, dense, params)


def test_the_op_schema_carries_the_slopes():
    schema = str(ops.paged_attention._opoverload._schema)
    assert "float[]? alibi_slopes=None" in schema


# -- FlashInfer: ALiBi bound to the installed FlashInfer's signatures, checked on a stand-in ----------


def test_flashinfer_executor_plans_alibi_and_matches_the_torch_executor(monkeypatch):
    import sys

    import hf_paged
    pytest.importorskip("flashinfer")  # the stand-in binds FlashInfer's real signatures
    from stand_in import Comparer, fake_flashinfer

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    model = tiny_model("bloom")
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 4))
    hf_paged.wrap(model, num_pages=256, page_size=4, backend="torch", cascade=True)
    comparer = model.hf_paged_runtime.executor = Comparer()
    model.generate(input_ids, attention_mask=mask, pad_token_id=0, max_new_tokens=5, num_beams=3)
    wrappers = comparer.flashinfer._devices[torch.device("cpu")].wrappers
    assert {kind for kind, _, _ in wrappers} == {"decode", "prefill"}  # no cascade plan with ALiBi
    assert all(w.wrapper.planned["pos_encoding_mode"] == "ALIBI" for w in wrappers.values())
    assert comparer.num_compared >= 2 * 5


def test_flashinfer_refuses_slopes_it_does_not_compute():
    pytest.importorskip("flashinfer")
    from hf_paged.attention.flashinfer import args as fb

    standard = LayerParams(4, 4, 64, 0.125, alibi_slopes=(2**-2, 2**-4, 2**-6, 2**-8))
    assert fb.alibi_mode(standard) == "ALIBI" and fb.alibi_mode(LayerParams(4, 4, 64, 0.125)) == "NONE"
    with pytest.raises(ValueError, match="backend='torch'"):
        fb.alibi_mode(LayerParams(4, 4, 64, 0.125, alibi_slopes=slopes(4)))


def test_compiled_decode_of_an_alibi_family_carries_the_slopes():
    """compile=True on Bloom: each decode step runs the patched attention through the custom op."""
    import hf_paged
    from hf_paged.integration.compile import compile_decode
    model = tiny_model("bloom")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, compile=True)
    backend = CountingBackend()
    compiled = compile_decode(model, backend=backend)
    assert torch.equal(model.generate(input_ids, **kwargs), expected)
    assert compiled.num_compiled_steps == 9 and backend.num_graphs == 1


@pytest.mark.parametrize("soft_cap", [0.0, 5.0])
def test_an_alibi_bias_takes_every_attention_path(soft_cap):
    """The bias is added to the scaled scores on SDPA's path, the fused path with LSE (cascade's) and
    the explicit one (soft-capping): all agree with a dense computation."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    params = LayerParams(4, 2, 16, 0.25, logits_soft_cap=soft_cap, alibi_slopes=slopes(4))
    bias = torch.randn(2, 2, 6, 9)
    bias[..., -2:] = float("-inf")  # keys not attended
    scores = (q @ k.transpose(-1, -2)) * 0.25 + bias.nan_to_num(neginf=0.0)
    if soft_cap:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    scores = scores.masked_fill(bias == float("-inf"), float("-inf"))  # masked keys stay masked after the cap
    expected = torch.softmax(scores, dim=-1) @ v
    for return_lse in (False, True):
        out, lse = torch_backend.attend(q, k, v, bias, params, return_lse=return_lse)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if return_lse:
            torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-5, atol=1e-5)
