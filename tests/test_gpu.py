"""GPU tests (CUDA + FlashInfer): skipped without a GPU, run by .github/workflows/gpu.yml.

1. Executor numerics: the FlashInfer executor against a float64 reference (the torch executor on a
   float64 copy of the same pool) on the same metadata, each (token, head) output within a relative
   error of 2 bf16 epsilons of the reference's norm (tests/numerics.py: one dropped or duplicated key
   among a thousand fails, tests/test_numerics.py shows it on CPU); page sizes 1 and 16, awkward
   lengths, GQA group sizes 1, 4 and 7, ragged prefill, decode, beams sharing pages (copy-on-write),
   sliding window, soft-cap, peaked scores where single keys dominate.
   Shared-prefix (cascade) plans against plain attention.
2. generate(): the wrapped model (FlashInfer) against the unwrapped model, bf16, greedy and beam
   search, with and without cascade, compiled CUDA-graph decode steps (the trained default model on
   the built-in task's prompts: a real next-token distribution), and a random Gemma-3-style model
   whose sliding group has pages of its own size: at least 99% of the generated tokens agree (see
   `numerics.token_agreement`: each greedy token is judged on its own, nothing is forgiven after a tie).
"""

import pytest
import torch
import transformers

import hf_paged
from hf_paged.attention import LayerParams
from hf_paged.attention.flashinfer.executor import FlashInferExecutor
from hf_paged.config import PagedConfig
from hf_paged.memory.pool import KVPool, LayerSpec

from numerics import (
    CASES, GPU_NEW_TOKENS, GPU_VOCAB, VARIANTS, assert_matches_reference, build_forward, default_model_and_prompts,
    gpu_prompts, layer_params, reference_output, token_agreement,
)

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_matches_torch_executor(page_size, group, case, variant):
    num_kv_heads, head_dim = 2, 128
    history, qo_lens, fork = CASES[case]
    spec = LayerSpec(num_kv_heads, head_dim, DEVICE, DTYPE)
    pool = KVPool(PagedConfig(page_size=page_size, num_pages=4096 // page_size + 64, backend="torch"), [spec])
    meta, _ = build_forward(pool, history, qo_lens, fork, seed=page_size * 100 + group)
    assert meta.is_decode == (case.startswith("decode"))
    params = layer_params(group * num_kv_heads, num_kv_heads, head_dim, variant)
    q = torch.randn(sum(qo_lens), params.num_qo_heads, head_dim, device=DEVICE).to(DTYPE)

    flashinfer = FlashInferExecutor()
    actual = flashinfer.run(q, pool.pools[0], flashinfer.plan(meta, params, pool))
    assert actual.dtype == DTYPE and actual.shape == q.shape
    assert_matches_reference(actual, reference_output(q, pool, meta, params), f"{case} {variant}")


CASCADE_CASES = {
    "decode_beams": ([64, 100], [1] * 8, [0, 0, 0, 0, 1, 1, 1, 1]),
    "append_beams_ragged": ([48, 33, 5], [2, 1, 3, 4, 1, 2], [0, 0, 0, 1, 1, 2]),  # row 2 shares nothing
}


@pytest.mark.parametrize("case", sorted(CASCADE_CASES))
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_cascade_matches_torch_executor(page_size, group, case):
    """Shared-prefix attention (prefix level + suffix level + merge_state) against plain attention."""
    from hf_paged.attention.flashinfer.cascade import FlashInferCascadePlan

    history, qo_lens, fork = CASCADE_CASES[case]
    spec = LayerSpec(2, 128, DEVICE, DTYPE)
    pool = KVPool(PagedConfig(page_size=page_size, num_pages=2048 // page_size + 64, backend="torch"), [spec])
    meta, _ = build_forward(pool, history, qo_lens, fork, seed=group, cascade=True)
    params = LayerParams(group * 2, 2, 128, 128**-0.5)
    q = torch.randn(sum(qo_lens), params.num_qo_heads, 128, device=DEVICE).to(DTYPE)
    flashinfer = FlashInferExecutor()
    plan = flashinfer.plan(meta, params, pool)
    assert isinstance(plan, FlashInferCascadePlan)
    actual = flashinfer.run(q, pool.pools[0], plan)
    meta.cascade = False  # the reference attends every row's whole page table
    assert_matches_reference(actual, reference_output(q, pool, meta, params), case)


def test_one_executor_serves_many_forwards_and_settings():
    """Long-lived wrappers: re-planned every forward, one per layer setting, results stay right."""
    spec = LayerSpec(2, 64, DEVICE, DTYPE)
    pool = KVPool(PagedConfig(page_size=16, num_pages=512, backend="torch"), [spec])
    flashinfer = FlashInferExecutor()
    settings = [LayerParams(8, 2, 64, 0.125), LayerParams(8, 2, 64, 0.125, window_left=3)]
    for step, (history, qo_lens, fork) in enumerate(list(CASES.values()) * 2):
        meta, tables = build_forward(pool, history, qo_lens, fork, seed=step)
        plans = [(p, flashinfer.plan(meta, p, pool)) for p in settings]  # both planned before either runs
        q = torch.randn(sum(qo_lens), 8, 64, device=DEVICE).to(DTYPE)
        for params, plan in plans:
            expected = reference_output(q, pool, meta, params)
            assert_matches_reference(flashinfer.run(q, pool.pools[0], plan), expected, f"step {step}")
        tables.release()
    assert pool.blocks.num_used_pages == 0


def test_a_plan_that_overflows_the_workspace_grows_it_and_stays_right(monkeypatch):
    """The growth path reuses each wrapper's own int workspace (FlashInfer's private
    `_int_workspace_buffer`): if FlashInfer renames it, this fails here rather than in production."""
    from hf_paged.attention.flashinfer import executor as flashinfer_executor

    monkeypatch.setattr(flashinfer_executor, "WORKSPACE_BYTES", 1 << 10)  # far too small for any plan
    history, qo_lens, fork = CASES["prefill_ragged"]
    pool = KVPool(PagedConfig(page_size=16, num_pages=512, backend="torch"), [LayerSpec(2, 128, DEVICE, DTYPE)])
    meta, _ = build_forward(pool, history, qo_lens, fork, seed=5)
    params = LayerParams(8, 2, 128, 128**-0.5)
    q = torch.randn(sum(qo_lens), 8, 128, device=DEVICE).to(DTYPE)
    flashinfer = FlashInferExecutor()
    plan = flashinfer.plan(meta, params, pool)
    [state] = flashinfer._devices.values()
    assert state.workspace.numel() > 1 << 10 and state.retired, "the workspace did not grow"
    assert_matches_reference(flashinfer.run(q, pool.pools[0], plan), reference_output(q, pool, meta, params))


def test_auto_backend_picks_flashinfer_for_bf16_on_cuda():
    model = small_llama()
    hf_paged.wrap(model, num_pages=64)
    assert model.hf_paged_runtime.executor.name == "flashinfer"
    hf_paged.unwrap(model)
    with pytest.raises(ValueError, match="no fp32 kernels"):
        hf_paged.wrap(model.float(), num_pages=64, backend="flashinfer")


# -- generate() token agreement -------------------------------------------------------------------

VOCAB = GPU_VOCAB
NEW_TOKENS = GPU_NEW_TOKENS


def small_llama(seed: int = 0) -> torch.nn.Module:
    """A random Llama (head dim 64, GQA group 2, vocabulary 64) in bf16 on CUDA."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()


def prompts(batch: int = 4, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return gpu_prompts(DEVICE, batch, length)


@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_generate_with_flashinfer_agrees_with_stock(mode, page_size, cascade):
    model, input_ids, mask = default_model_and_prompts(DEVICE, DTYPE, batch=4)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, num_beams=4 if mode == "beam" else 1)
    stock = model.generate(input_ids, **kwargs)
    rows = input_ids.shape[0] * kwargs["num_beams"]
    pages = rows * (input_ids.shape[1] + NEW_TOKENS) // page_size + 2 * rows + 64
    hf_paged.wrap(model, num_pages=pages, page_size=page_size, backend="flashinfer", cascade=cascade)
    paged = model.generate(input_ids, **kwargs)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    hf_paged.unwrap(model)
    assert paged.shape == stock.shape
    agreement = token_agreement(stock, paged, model, mask, input_ids.shape[1], beams=mode == "beam")
    assert agreement >= 0.99, f"{mode}: {agreement:.3f} of tokens agree"


def test_compiled_cuda_graph_decode_with_flashinfer_agrees_with_stock():
    """compile=True on CUDA: mode="reduce-overhead" (CUDA graphs), FlashInfer's CUDA-graph decode
    wrapper planned before each replay outside the graph, run inside it through the custom op."""
    from hf_paged.integration.compile import compile_decode

    model, input_ids, mask = default_model_and_prompts(DEVICE, DTYPE, batch=4)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False)
    stock = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=256, page_size=16, backend="flashinfer", compile=True)
    compiled = compile_decode(model)  # fullgraph, mode="reduce-overhead" on CUDA
    assert compiled.backend == "flashinfer"
    paged = model.generate(input_ids, **kwargs)
    assert compiled.num_compiled_steps == NEW_TOKENS - 1
    hf_paged.unwrap(model)
    agreement = token_agreement(stock, paged, model, mask, input_ids.shape[1], beams=False)
    assert agreement >= 0.99, f"compiled greedy: {agreement:.3f} of tokens agree"


def small_gemma3(seed: int = 0) -> torch.nn.Module:
    """A random Gemma-3-style model (5 sliding layers with window 16 : 1 full) in bf16 on CUDA."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(DEVICE, DTYPE).eval()


@pytest.mark.parametrize("window_pages", [None, 1])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_sliding_window_groups_with_their_own_page_size_agree_with_stock(mode, window_pages):
    """FlashInfer on two groups of layers: the full one in pages of 16, the sliding one (window 16)
    in pages of 3 packed five to a full layer's page (layout.py: page views with the slice's page
    stride) or of 1 (asked for), planned per group, released pages left out of the metadata;
    prompts past the window (their sliding layers attend from the forward's own K/V: inflight.py)
    and generations well past it."""
    model = small_gemma3()
    input_ids, mask = prompts(length=40)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, num_beams=4 if mode == "beam" else 1)
    stock = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=2048, page_size=16, backend="flashinfer", window_page_size=window_pages)
    expected = 3 if window_pages is None else 1
    assert [(g.window, g.page_size) for g in model.hf_paged_runtime.groups] == [(None, 16), (16, expected)]
    paged = model.generate(input_ids, **kwargs)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    hf_paged.unwrap(model)
    agreement = token_agreement(stock, paged, model, mask, input_ids.shape[1], beams=mode == "beam")
    assert agreement >= 0.99, f"{mode}: {agreement:.3f} of tokens agree"


@pytest.mark.parametrize("backend", ["torch", "flashinfer"])
def test_pool_peak_matches_what_cuda_allocates(backend):
    """memory_stats' pool peak against CUDA's own count: a pool of exactly the peak's pages (wrap()
    allocates it up front) serves the same call, and `torch.cuda.max_memory_allocated` over the
    call, minus the weights, is that pool (and its zero page) plus the forward's activations."""
    model = small_gemma3()
    dtype = DTYPE if backend == "flashinfer" else torch.float32
    model = model.to(dtype)
    input_ids, mask = prompts(length=200)  # prompts well past the window of 16
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=4)
    hf_paged.wrap(model, num_pages=4096, backend=backend)
    first = model.generate(input_ids, **kwargs)
    stats = hf_paged.memory_stats(model)
    peak_pages, page_bytes = stats["peak_pages_in_use"], stats["page_bytes"]
    hf_paged.unwrap(model)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    hf_paged.wrap(model, num_pages=peak_pages, backend=backend)
    pool = torch.cuda.memory_allocated() - weights
    # The slices are the pool: the peak's pages and the zero page, to the allocator's 512-byte rounding.
    slices = len(model.hf_paged_runtime.pool.slices)
    assert 0 <= pool - (peak_pages + 1) * page_bytes < 512 * slices
    torch.cuda.reset_peak_memory_stats()
    assert torch.equal(model.generate(input_ids, **kwargs), first)  # no OutOfPagesError at exactly the peak
    after = hf_paged.memory_stats(model)
    assert after["peak_pool_bytes"] == after["pool_bytes"] == peak_pages * page_bytes
    used = torch.cuda.max_memory_allocated() - weights
    activations = used - pool
    assert 0 <= activations < 64 << 20, (used, pool)

