"""GPU tests of fp8 pages (CUDA + FlashInfer): skipped without a GPU, run by .github/workflows/gpu.yml.

1. The FlashInfer executor on fp8 pages (`kv_data_type` e4m3 / e5m2, `run(k_scale=, v_scale=)`)
   against a float64 reference on the dequantized pool (stored x scale), each (token, head) output
   within 2 bf16 epsilons of the reference's norm (tests/numerics.py), page sizes 1 and 16, the
   cases and variants of tests/test_gpu.py. Head dim 64 is planned and run by the torch executor
   (support.FP8_HEAD_DIMS: FlashInfer's FA2 kernel notes it does not read fp8 pages of head dim 64).
2. generate() with fp8 pages, FlashInfer against the torch executor on the same GPU and scales:
   the first step's log-probs within bf16 rounding, and the default model (head dim 64: the
   fallback) with the torch executor's tokens.
"""

import pytest
import torch
import transformers

import hf_paged
from hf_paged.attention import TorchExecutor
from hf_paged.attention.flashinfer.executor import FlashInferExecutor, FlashInferPlan
from hf_paged.config import PagedConfig
from hf_paged.memory.pool import KVPool, LayerSpec

from numerics import CASES, VARIANTS, assert_matches_reference, build_forward, default_model_and_prompts, gpu_prompts, layer_params

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
SCALES = (0.5, 0.25)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_reads_fp8_pages_as_the_dequantized_reference(page_size, head_dim, case, variant, kv_cache_dtype):
    history, qo_lens, fork = CASES[case]
    config = PagedConfig(page_size=page_size, num_pages=4096 // page_size + 64, backend="torch",
                         kv_cache_dtype=kv_cache_dtype, kv_scales=SCALES)
    pool = KVPool(config, [LayerSpec(2, head_dim, DEVICE, DTYPE)])
    meta, _ = build_forward(pool, history, qo_lens, fork, seed=page_size * 100 + head_dim)
    params = layer_params(8, 2, head_dim, variant)
    q = torch.randn(sum(qo_lens), params.num_qo_heads, head_dim, device=DEVICE).to(DTYPE)
    flashinfer = FlashInferExecutor()
    plan = flashinfer.plan(meta, params, pool)
    assert isinstance(plan, FlashInferPlan) == (head_dim != 64)
    actual = flashinfer.run(q, pool.pools[0], plan, SCALES)
    assert actual.dtype == DTYPE and actual.shape == q.shape
    layer = pool.pools[0]
    dequantized = torch.stack([layer[0].double() * SCALES[0], layer[1].double() * SCALES[1]])
    torch_executor = TorchExecutor()
    reference = torch_executor.run(q.double(), dequantized, torch_executor.plan(meta, params, pool))
    assert_matches_reference(actual, reference, f"{case} {variant} {kv_cache_dtype} head_dim {head_dim}")


def _first_step_log_probs(model, input_ids, mask, backend):
    hf_paged.wrap(model, num_pages=512, page_size=16, backend=backend, kv_cache_dtype="fp8_e4m3", kv_scales=(0.05, 0.05))
    out = model.generate(input_ids, attention_mask=mask, pad_token_id=0, max_new_tokens=4, do_sample=False,
                         num_beams=2, return_dict_in_generate=True, output_logits=True)
    return out.logits[0].float().log_softmax(-1)


def test_generate_with_fp8_pages_on_flashinfer_matches_the_torch_executor():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE, DTYPE).eval()
    input_ids, mask = gpu_prompts(DEVICE)
    flashinfer = _first_step_log_probs(model, input_ids, mask, "flashinfer")
    assert type(model.hf_paged_runtime.executor).__name__ == "FlashInferExecutor"
    reference = _first_step_log_probs(model, input_ids, mask, "torch")
    assert (flashinfer - reference).abs().max() < 0.05  # bf16 rounding of logits of magnitude ~1


def test_default_model_head_dim_64_falls_back_to_the_torch_executor_per_layer():
    model, input_ids, mask = default_model_and_prompts(DEVICE, DTYPE, batch=4)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=16, min_new_tokens=16, do_sample=False, num_beams=4)
    results = {}
    for backend in ("flashinfer", "torch"):
        hf_paged.wrap(model, num_pages=1024, backend=backend, kv_cache_dtype="fp8_e4m3", kv_scales=(0.05, 0.05))
        results[backend] = model.generate(input_ids, **kwargs)
        assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    assert torch.equal(results["flashinfer"], results["torch"])
