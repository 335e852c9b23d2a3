"""fp8 KV pages (PagedConfig.kv_cache_dtype): the pool stores one byte per value, scales per layer,
clamps counted, and generate() gives the tokens of stock's model attending to the same dequantized K/V.

The reference is the unwrapped model with a DynamicCache that rounds every K/V it stores to fp8 and
back under the same scales (`FakeQuantCache`): in fp32, hf_paged's tokens must equal its tokens.
"""

import math

import pytest
import torch
from transformers import DynamicCache

import hf_paged
from hf_paged.memory import kv_quant
from hf_paged.memory.pool import copy_pages

import tiny
from tiny import fixed_length, padded_prompts, tiny_model

E4M3 = torch.float8_e4m3fn
SCALES = (0.02, 0.015)  # |K|, |V| of the tiny models stay below 448 x these


class FakeQuantCache(DynamicCache):
    """Stock's DynamicCache holding K/V rounded to `dtype` and back under scales (k, v); `scales`
    None: each layer's from its first update, amax x 2 / the dtype's max (docs/fp8.md's rule)."""

    def __init__(self, config, scales=SCALES, dtype=E4M3):
        super().__init__(config=config)
        self.given, self.dtype, self.layer_scales = scales, dtype, {}

    def _round(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        limit = torch.finfo(self.dtype).max
        return ((x.float() / scale).clamp(-limit, limit).to(self.dtype).to(x.dtype)) * scale

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        limit = torch.finfo(self.dtype).max
        first = tuple(float(x.abs().amax()) * 2 / limit for x in (key_states, value_states))
        k_scale, v_scale = self.layer_scales.setdefault(layer_idx, self.given or first)
        return super().update(self._round(key_states, k_scale), self._round(value_states, v_scale), layer_idx, *args, **kwargs)


def reference(model, input_ids, mask, seed=0, **kwargs):
    return tiny.generate(model, input_ids, mask, seed=seed, past_key_values=FakeQuantCache(model.config), **kwargs)


MODES = {
    "greedy": dict(),
    "sample": dict(do_sample=True, num_return_sequences=2, top_k=20),
    "beam": dict(num_beams=4, num_return_sequences=2),
}


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="kv_cache_dtype to be one of"):
        hf_paged.PagedConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_scales needs fp8 pages"):
        hf_paged.PagedConfig(kv_scales=(1.0, 1.0))
    for bad in [(0.0, 1.0), (1.0, float("inf")), (1.0,), [(1.0, 2.0), (1.0,)], "1,2", []]:
        with pytest.raises(ValueError, match="kv_scales to be"):
            hf_paged.PagedConfig(kv_cache_dtype="fp8_e4m3", kv_scales=bad)
    with pytest.raises(ValueError, match="exact=True alone.*kv_cache_dtype='fp8_e4m3'"):
        hf_paged.PagedConfig(exact=True, kv_cache_dtype="fp8_e4m3")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="kv_scales has 3 pairs but the model has 2"):
        hf_paged.wrap(model, num_pages=8, kv_cache_dtype="fp8_e4m3", kv_scales=[(1.0, 1.0)] * 3)
    assert not hasattr(model, "hf_paged_runtime")  # refused before anything was patched


@pytest.mark.parametrize(("dtype", "ratio"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_pool_pages_hold_one_byte_per_value(dtype, ratio):
    model = tiny_model("llama").to(dtype)
    auto = hf_paged.memory_stats(hf_paged.wrap(model, max_memory=1 << 20))
    fp8 = hf_paged.memory_stats(hf_paged.wrap(model, max_memory=1 << 20, kv_cache_dtype="fp8_e5m2"))
    assert auto["page_bytes"] == ratio * fp8["page_bytes"] == ratio * 16 * 2 * 2 * 2 * 16  # pages of 16, 2 layers, K+V, 2 heads x 16
    assert fp8["num_pages"] == (1 << 20) // fp8["page_bytes"]  # the same budget holds `ratio` x the pages
    assert (auto["kv_cache_dtype"], fp8["kv_cache_dtype"], fp8["kv_dtype"]) == ("auto", "fp8_e5m2", "float8_e5m2")
    assert auto["kv_dtype"] == str(dtype).removeprefix("torch.") and "kv_scales" not in auto
    assert fp8["kv_scales"] == [None, None] and fp8["kv_clamped_values"] == 0
    assert all(pool.dtype == torch.float8_e5m2 for pool in model.hf_paged_runtime.pool.pools)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_tokens_equal_stock_on_dequantized_kv(family, mode):
    """fp32: stock with K/V rounded through fp8 (FakeQuantCache) and hf_paged's fp8 pages give the
    same tokens: gemma2 (soft cap, window 5) and mistral (window 5) cross their windows many times."""
    model = tiny_model(family)
    input_ids, mask = padded_prompts()
    kwargs = dict(**fixed_length(12), **MODES[mode], output_scores=True, return_dict_in_generate=True)
    expected = reference(model, input_ids, mask, **kwargs)
    unrounded = tiny.generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, kv_cache_dtype="fp8_e4m3", kv_scales=SCALES)
    paged = tiny.generate(model, input_ids, mask, **kwargs)
    assert torch.equal(paged.sequences, expected.sequences)
    paged = (paged.sequences, paged.scores)  # (the output's cache holds its pages until the output goes)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == 0 and stats["kv_clamped_values"] == 0
    assert stats["kv_scales"] == [SCALES, SCALES]
    # The scores of the first step (the same prompt everywhere): equal to the reference's to fp32
    # rounding, and the rounding to fp8 moved them far more than that (the reference is not stock's).
    first, want, unquantized = paged[1][0], expected.scores[0], unrounded.scores[0]
    finite = torch.isfinite(want)
    torch.testing.assert_close(first[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert (first[finite] - unquantized[finite]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_dense_forwards_read_dequantized_pages(family):
    """Right padding and holes (a forward run dense over K/V read back from the pages, cache/dense.py)."""
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=3, length=12, pads=(2, 0, 1))
    mask[1, -3:] = 0  # right padding
    mask[2, 5:7] = 0  # a hole
    kwargs = dict(**fixed_length(8), output_scores=True, return_dict_in_generate=True)
    expected = reference(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, kv_cache_dtype="fp8_e4m3", kv_scales=SCALES)
    paged = tiny.generate(model, input_ids, mask, **kwargs)
    assert torch.equal(paged.sequences, expected.sequences)
    for got, want in zip(paged.scores, expected.scores):
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_prefix_cache_keeps_the_tokens():
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(pads=(0, 0), length=20)
    kwargs = dict(**fixed_length(10), num_beams=3)
    expected = reference(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, kv_cache_dtype="fp8_e4m3", kv_scales=SCALES, prefix_cache=True)
    first = tiny.generate(model, input_ids, mask, **kwargs)
    again = tiny.generate(model, input_ids, mask, **kwargs)  # reads the first call's fp8 pages
    assert hf_paged.memory_stats(model)["prefix_hits"] > 0
    assert torch.equal(first, expected) and torch.equal(again, expected)


@pytest.mark.slow
def test_compiled_decode_keeps_the_tokens():
    model = tiny_model("llama")
    input_ids, mask = padded_prompts()
    kwargs = dict(**fixed_length(10))
    expected = reference(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, kv_cache_dtype="fp8_e4m3", kv_scales=SCALES, compile=True)
    assert torch.equal(tiny.generate(model, input_ids, mask, **kwargs), expected)
    assert model.hf_paged_runtime.compiled is not None


def test_scales_default_to_the_first_forward_amax_with_headroom():
    model = tiny_model("llama")
    input_ids = torch.randint(3, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    # The first forward writes the whole prompt (greedy, no padding); a later layer's K/V follow from
    # the rounded K/V of the layers before it, as in the reference.
    stock = FakeQuantCache(model.config, scales=None)
    with torch.no_grad():
        model(input_ids, past_key_values=stock)
    hf_paged.wrap(model, num_pages=64, kv_cache_dtype="fp8_e4m3")
    model.generate(input_ids, **fixed_length(4), pad_token_id=0)
    scales = hf_paged.memory_stats(model)["kv_scales"]
    assert scales == [pytest.approx(stock.layer_scales[layer], rel=1e-6) for layer in range(2)]
    model.generate(input_ids[:, :3] * 2 % tiny.VOCAB, **fixed_length(4), pad_token_id=0)
    assert hf_paged.memory_stats(model)["kv_scales"] == scales  # set once, for the pool's life


def test_checkpoint_scales_are_read(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    for layer, module in enumerate(model.model.layers):
        module.self_attn.k_scale = torch.nn.Parameter(torch.tensor(0.03 + layer / 100), requires_grad=False)
        module.self_attn.v_scale = torch.nn.Parameter(torch.tensor([0.02]), requires_grad=False)
    hf_paged.wrap(model, num_pages=64, kv_cache_dtype="fp8_e4m3")
    input_ids, mask = padded_prompts()
    tiny.generate(model, input_ids, mask, **fixed_length(3))
    scales = hf_paged.memory_stats(model)["kv_scales"]
    assert [pytest.approx(pair) for pair in scales] == [(0.03, 0.02), (0.04, 0.02)]
    # The same tensors in a checkpoint's files: read into PagedConfig(kv_scales=...).
    save_file({f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor(0.5 + i) for i in range(2) for kv in "kv"},
              str(tmp_path / "model.safetensors"))
    assert kv_quant.checkpoint_scales(tmp_path) == [(0.5, 0.5), (1.5, 1.5)]
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(1.0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no k_scale and v_scale for every layer"):
        kv_quant.checkpoint_scales(tmp_path)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_overflow_is_clamped_and_counted(kv_cache_dtype):
    model = tiny_model("llama")
    tiny_scales = (1e-4, 1e-6)  # far too small: most values exceed the fp8 range
    hf_paged.wrap(model, num_pages=64, page_size=4, kv_cache_dtype=kv_cache_dtype, kv_scales=tiny_scales)
    for piece in model.hf_paged_runtime.pool.slices:  # (torch.empty: unwritten bytes are anything)
        piece.zero_()
    input_ids, mask = padded_prompts()
    out = tiny.generate(model, input_ids, mask, output_logits=True, return_dict_in_generate=True, **fixed_length(5))
    assert all(torch.isfinite(logits).all() for logits in out.logits)
    stats = hf_paged.memory_stats(model)
    assert stats["kv_clamped_values"] > 0
    for pool in model.hf_paged_runtime.pool.pools:
        values = pool.float()
        assert torch.isfinite(values).all()
        assert values.abs().max() == torch.finfo(pool.dtype).max  # clamped to the range's edge


def test_quantize_counts_exactly():
    count = torch.zeros((), dtype=torch.int64)
    x = torch.tensor([1.0, -900.0, 896.0, 898.0, float("-inf")])
    out = kv_quant.quantize(x, 2.0, E4M3, 448.0, count)
    assert out.float().tolist() == [0.5, -448.0, 448.0, 448.0, -448.0]
    assert int(count) == 3  # -450, 449 and -inf lie beyond +-448; 448 itself does not


def test_copy_on_write_keeps_the_bytes():
    pool = torch.empty(2, 5, 4, 2, 8, dtype=torch.uint8).random_(0, 255).view(E4M3)
    before = pool.view(torch.uint8).clone()
    copy_pages(pool, torch.tensor([0, 3]), torch.tensor([2, 1]))
    after = pool.view(torch.uint8)
    assert torch.equal(after[:, 2], before[:, 0]) and torch.equal(after[:, 1], before[:, 3])  # NaN bytes too
    assert torch.equal(after[:, [0, 3, 4]], before[:, [0, 3, 4]])


def test_torch_executor_dequantizes_only_the_pages_a_step_reads(monkeypatch):
    model = tiny_model("llama")
    hf_paged.wrap(model, num_pages=256, page_size=4, kv_cache_dtype="fp8_e4m3", kv_scales=SCALES)
    sizes = []
    real = kv_quant.dequantize

    def counting(x, dtype, scale):
        sizes.append(x.numel())
        return real(x, dtype, scale)

    for module in ("hf_paged.attention.torch.dense", "hf_paged.attention.torch.cascade"):
        monkeypatch.setattr(f"{module}.dequantize", counting)
    input_ids, mask = padded_prompts()
    tiny.generate(model, input_ids, mask, num_beams=2, **fixed_length(6))
    pool_values = model.hf_paged_runtime.pool.pools[0][0].numel()
    rows_tokens = 2 * 2 * math.ceil((13 + 6) / 4) * 4  # 2 prompts x 2 beams, whole pages of their tokens
    assert sizes and max(sizes) <= rows_tokens * 2 * 16 < pool_values / 10


@pytest.mark.parametrize("case", ["beam", "sample", "window"])
def test_peak_pool_bytes_about_half_of_bf16_pages(case):
    """A bf16 model: the same run with fp8 pages peaks at <= 0.52x the pool bytes of "auto" pages."""
    model = (tiny_model("gemma2") if case == "window" else tiny_model("llama")).to(torch.bfloat16)
    input_ids, mask = padded_prompts(length=24, pads=(0, 6))
    kwargs = dict(**fixed_length(24), **(MODES["beam"] if case == "beam" else MODES["sample"]))
    peaks = {}
    for dtype in ("auto", "fp8_e4m3"):
        hf_paged.wrap(model, max_memory=1 << 22, page_size=4, kv_cache_dtype=dtype)
        tiny.generate(model, input_ids, mask, **kwargs)
        peaks[dtype] = hf_paged.memory_stats(model)["peak_pool_bytes"]
    assert 0 < peaks["fp8_e4m3"] <= 0.52 * peaks["auto"], peaks


def _llama_of_head_dim(head_dim: int) -> torch.nn.Module:
    """A tiny Llama (4 query / 2 KV heads) of head dim `head_dim`, for the FlashInfer fp8 head-dim rule."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=head_dim, **tiny.COMMON,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("head_dim", [128, 16])
def test_flashinfer_executor_reads_fp8_pages_through_its_api(monkeypatch, head_dim):
    """The FlashInfer executor on the stand-in (tests/stand_in.py: the installed FlashInfer's
    signatures, its documented k_scale/v_scale semantics): plans with kv_data_type fp8 and runs with
    the layer's scales, matching the torch executor; a head dim its kernels do not read from fp8
    pages (16 here, 64 too: support.FP8_HEAD_DIMS) is planned and run by the torch executor."""
    pytest.importorskip("flashinfer")
    import sys

    from stand_in import Comparer, fake_flashinfer

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    model = _llama_of_head_dim(head_dim)
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 5))
    hf_paged.wrap(model, num_pages=256, page_size=4, backend="torch", kv_cache_dtype="fp8_e5m2")
    comparer = model.hf_paged_runtime.executor = Comparer()
    tiny.generate(model, input_ids, mask, num_beams=2, **fixed_length(5))
    assert comparer.num_compared >= 2 * 5
    wrappers = comparer.flashinfer._devices[torch.device("cpu")].wrappers if head_dim == 128 else {}
    served = {"FlashInferPlan"} if head_dim == 128 else {"TorchPlan", "CascadePlan"}  # (the torch executor's)
    assert comparer.plan_types and set(comparer.plan_types) <= served
    for record in wrappers.values():
        assert record.wrapper.planned["kv_data_type"] == torch.float8_e5m2
        assert record.wrapper.planned["q_data_type"] == torch.float32


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("case", ["prefill_ragged", "append_ragged", "decode", "decode_beams_shared", "append_beams_shared"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_torch_executor_matches_the_dequantized_reference(page_size, case, kv_cache_dtype):
    """Executor level, as tests/test_gpu_fp8.py checks FlashInfer: bf16 queries on fp8 pages against
    float64 attention on the dequantized pool (stored x scale), within 2 bf16 epsilons per output."""
    from numerics import CASES, assert_matches_reference, build_forward, layer_params

    from hf_paged.attention import TorchExecutor
    from hf_paged.config import PagedConfig
    from hf_paged.memory.pool import KVPool, LayerSpec

    history, qo_lens, fork = CASES[case]
    config = PagedConfig(page_size=page_size, num_pages=4096 // page_size + 64, kv_cache_dtype=kv_cache_dtype,
                         kv_scales=(0.5, 0.25))
    pool = KVPool(config, [LayerSpec(2, 16, torch.device("cpu"), torch.bfloat16)])
    meta, _ = build_forward(pool, history, qo_lens, fork, seed=page_size)
    params = layer_params(8, 2, 16, "peaked")
    q = torch.randn(sum(qo_lens), 8, 16).to(torch.bfloat16)
    executor = TorchExecutor()
    actual = executor.run(q, pool.pools[0], executor.plan(meta, params, pool), (0.5, 0.25))
    layer = pool.pools[0]
    dequantized = torch.stack([layer[0].double() * 0.5, layer[1].double() * 0.25])
    reference = executor.run(q.double(), dequantized, executor.plan(meta, params, pool))
    assert_matches_reference(actual, reference, case)
    wrong = executor.run(q, pool.pools[0], executor.plan(meta, params, pool), (0.5, 0.5))  # the test bites
    with pytest.raises(AssertionError):
        assert_matches_reference(wrong, reference, case)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_cross_attention_pages(family):
    """Cross-attention pages (written once per input, cache/cross.py) in fp8 too: stock with both
    caches rounding through fp8 gives the same tokens (beams; T5's position bias)."""
    from seq2seq_models import make, sources
    from transformers import EncoderDecoderCache

    model = make(family)
    inputs = sources()
    kwargs = dict(max_new_tokens=8, num_beams=3, output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    cache = EncoderDecoderCache(FakeQuantCache(model.config), FakeQuantCache(model.config))
    expected = model.generate(**inputs, past_key_values=cache, **kwargs)
    hf_paged.wrap(model, page_size=4, kv_cache_dtype="fp8_e4m3", kv_scales=SCALES)
    torch.manual_seed(0)
    paged = model.generate(**inputs, **kwargs)
    assert torch.equal(paged.sequences, expected.sequences)
    torch.testing.assert_close(paged.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == 0 and all(pair == SCALES for pair in stats["kv_scales"])
    assert len(stats["kv_scales"]) == 4  # 2 self-attention and 2 cross-attention layers


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [128, 16])
def test_compiled_flashinfer_decode_reads_fp8_pages(monkeypatch, head_dim):
    """compile=True with the FlashInfer executor (on the stand-in): CUDA-graph decode wrappers planned
    with kv_data_type fp8 and run with the scales inside the compiled step; a head dim FlashInfer does
    not read from fp8 runs the torch runner there. Tokens of stock with rounding caches."""
    pytest.importorskip("flashinfer")
    import sys

    from stand_in import fake_flashinfer

    from hf_paged.attention.flashinfer.executor import FlashInferExecutor
    from hf_paged.integration.compile import compile_decode

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    model = _llama_of_head_dim(head_dim)
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 5))
    kwargs = dict(**fixed_length(6), num_beams=2)
    expected = reference(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, compile=True, backend="torch", kv_cache_dtype="fp8_e4m3",
                  kv_scales=SCALES)
    executor = model.hf_paged_runtime.executor = FlashInferExecutor()
    compiled = compile_decode(model, backend="eager")
    assert torch.equal(tiny.generate(model, input_ids, mask, **kwargs), expected)
    assert compiled.num_compiled_steps > 0
    graph = [record for key, record in executor._devices[torch.device("cpu")].wrappers.items() if key[0] == "graph"]
    if head_dim == 128:
        assert graph and all(r.wrapper.planned["kv_data_type"] == E4M3 and r.wrapper.runs for r in graph)
    else:
        assert not graph  # the torch runner read them
