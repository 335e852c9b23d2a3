"""GPU tests (CUDA + FlashInfer): skipped without a GPU, run by .github/workflows/gpu.yml.

1. Executor numerics: the FlashInfer executor against the torch executor (run in float32 on a
   float32 copy of the same pool) on the same metadata, bf16 tolerance; page sizes 1 and 16,
   awkward lengths, GQA group sizes 1, 4 and 7, ragged prefill, decode, beams sharing pages
   (copy-on-write), sliding window, soft-cap.
   Shared-prefix (cascade) plans against plain attention.
2. generate(): the wrapped model (FlashInfer) against the unwrapped model, bf16, greedy and beam
   search, with and without cascade, compiled CUDA-graph decode steps, and a Gemma-3-style model
   whose sliding group has pages of its own size: at least 99% of the generated tokens agree (see
   `token_agreement` for near-ties).
"""

import pytest
import torch
import transformers

import hf_paged
from hf_paged.attention import LayerParams, TorchExecutor
from hf_paged.attention.flashinfer.executor import FlashInferExecutor
from hf_paged.config import PagedConfig
from hf_paged.metadata import ForwardMetadata, build_metadata
from hf_paged.pool import KVPool, LayerSpec, copy_pages
from hf_paged.tables import PageTables

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
ATOL = RTOL = 2e-2  # bf16 inputs (eps 2^-8), outputs of magnitude <= ~3


def write_tokens(pool: KVPool, slots: list[int], generator: torch.Generator) -> None:
    """Random K/V (N(0, 1)) for the tokens at `slots` of the single layer's pool, as the cache writes them."""
    layer = pool.pools[0]
    num_kv_heads, head_dim = layer.shape[-2:]
    slot = torch.tensor(slots, dtype=torch.int64, device=layer.device)
    flat = layer.view(2, -1, num_kv_heads, head_dim)
    for plane in (0, 1):
        values = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator, device=layer.device)
        flat[plane].index_copy_(0, slot, values.to(layer.dtype))


def build_forward(
    pool: KVPool, history: list[int], qo_lens: list[int], fork: list[int] | None, seed: int, cascade: bool = False
) -> tuple[ForwardMetadata, PageTables]:
    """Rows holding `history[i]` tokens (then re-selected as rows `fork`, sharing pages), plus
    `qo_lens[i]` new tokens written; returns the metadata of the forward of those new tokens
    and the page tables (release them to give the pages back)."""
    generator = torch.Generator(device=pool.pools[0].device).manual_seed(seed)
    tables = PageTables(pool.blocks, pool.page_size)
    tables.add_rows(len(history))
    slots, _ = tables.append(history)
    write_tokens(pool, slots, generator)
    if fork is not None:
        tables.select_rows(fork)
    slots, copies = tables.append(qo_lens)
    layer = pool.pools[0]
    if copies:  # copy-on-write of shared partly filled pages, as the cache does before writing
        src, dst = (torch.tensor(c, device=layer.device) for c in zip(*copies))
        copy_pages(layer, src, dst)
    write_tokens(pool, slots, generator)
    q_len = max(qo_lens)
    ragged = any(n != q_len for n in qo_lens)
    token_index = torch.zeros(1, dtype=torch.int64, device=layer.device) if ragged else None  # unused by executors
    meta = build_metadata(tables, qo_lens, q_len, slots, copies, token_index, layer.device, cascade)
    return meta, tables


CASES = {
    # name: (history per row, new tokens per row, rows re-selected from the history rows or None)
    "prefill_ragged": ([0, 0, 0, 0], [1, 17, 33, 130], None),
    "append_ragged": ([5, 16, 0, 250, 31], [3, 1, 0, 9, 16], None),  # a row with nothing at all
    "decode": ([1, 15, 16, 17, 255, 1000], [1] * 6, None),
    "decode_beams_shared": ([37, 64], [1] * 6, [0, 0, 0, 1, 1, 1]),  # copy-on-write of page 3 of row 0
    "append_beams_shared": ([37, 64], [2, 5, 1, 3], [0, 0, 1, 1]),
}
VARIANTS = {
    "plain": {},
    "window": {"window_left": 7},
    "softcap": {"logits_soft_cap": 30.0},
}


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
    params = LayerParams(group * num_kv_heads, num_kv_heads, head_dim, head_dim**-0.5, **VARIANTS[variant])
    q = torch.randn(sum(qo_lens), params.num_qo_heads, head_dim, device=DEVICE).to(DTYPE)

    flashinfer = FlashInferExecutor()
    actual = flashinfer.run(q, pool.pools[0], flashinfer.plan(meta, params, pool))
    reference_pool = pool.pools[0].float()
    torch_executor = TorchExecutor()
    expected = torch_executor.run(q.float(), reference_pool, torch_executor.plan(meta, params, pool))
    assert actual.dtype == DTYPE and actual.shape == q.shape
    torch.testing.assert_close(actual.float(), expected, atol=ATOL, rtol=RTOL)


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
    torch_executor = TorchExecutor()
    expected = torch_executor.run(q.float(), pool.pools[0].float(), torch_executor.plan(meta, params, pool))
    torch.testing.assert_close(actual.float(), expected, atol=ATOL, rtol=RTOL)


def test_one_executor_serves_many_forwards_and_settings():
    """Long-lived wrappers: re-planned every forward, one per layer setting, results stay right."""
    spec = LayerSpec(2, 64, DEVICE, DTYPE)
    pool = KVPool(PagedConfig(page_size=16, num_pages=512, backend="torch"), [spec])
    flashinfer, torch_executor = FlashInferExecutor(), TorchExecutor()
    settings = [LayerParams(8, 2, 64, 0.125), LayerParams(8, 2, 64, 0.125, window_left=3)]
    for step, (history, qo_lens, fork) in enumerate(list(CASES.values()) * 2):
        meta, tables = build_forward(pool, history, qo_lens, fork, seed=step)
        plans = [(p, flashinfer.plan(meta, p, pool)) for p in settings]  # both planned before either runs
        q = torch.randn(sum(qo_lens), 8, 64, device=DEVICE).to(DTYPE)
        for params, plan in plans:
            expected = torch_executor.run(q.float(), pool.pools[0].float(), torch_executor.plan(meta, params, pool))
            torch.testing.assert_close(flashinfer.run(q, pool.pools[0], plan).float(), expected, atol=ATOL, rtol=RTOL)
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
    flashinfer, torch_executor = FlashInferExecutor(), TorchExecutor()
    plan = flashinfer.plan(meta, params, pool)
    [state] = flashinfer._devices.values()
    assert state.workspace.numel() > 1 << 10 and state.retired, "the workspace did not grow"
    expected = torch_executor.run(q.float(), pool.pools[0].float(), torch_executor.plan(meta, params, pool))
    torch.testing.assert_close(flashinfer.run(q, pool.pools[0], plan).float(), expected, atol=ATOL, rtol=RTOL)


def test_auto_backend_picks_flashinfer_for_bf16_on_cuda():
    model = small_llama()
    hf_paged.wrap(model, num_pages=64)
    assert model.hf_paged_runtime.executor.name == "flashinfer"
    hf_paged.unwrap(model)
    with pytest.raises(ValueError, match="no fp32 kernels"):
        hf_paged.wrap(model.float(), num_pages=64, backend="flashinfer")


# -- generate() token agreement -------------------------------------------------------------------

VOCAB = 64
NEW_TOKENS = 32
GREEDY_TIE_NATS = 0.03  # log-prob margins below this are decided by bf16 rounding (measured noise <= 0.01)
BEAM_TIE_NATS = 0.5  # summed over 32 tokens (~ -110 nats): beams of a random model tie this closely


def small_llama(seed: int = 0) -> torch.nn.Module:
    """A random Llama (head dim 64, GQA group 2, vocabulary 64) in bf16 on CUDA."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()


def prompts(batch: int = 4, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, pads in enumerate([0, 7, 0, 15][:batch]):
        input_ids[row, :pads], mask[row, :pads] = 0, 0
    return input_ids.to(DEVICE), mask.to(DEVICE)


@torch.no_grad()
def log_probs(model: torch.nn.Module, sequences: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[rows, new tokens] float32 log-prob of each generated token under `model` (teacher forcing)."""
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(sequences, attention_mask=full_mask, position_ids=position_ids).logits.float()
    logp = logits[:, prompt_len - 1 : -1].log_softmax(-1)
    return logp.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)


def token_agreement(stock, paged, model, mask, prompt_len: int, beams: bool) -> float:
    """Fraction of all generated tokens (rows x new tokens: never 0) that do not disagree.

    Each row agrees up to its first differing token. There the unwrapped `model` judges, by
    teacher forcing: greedy, the two tokens' log-probs after the shared prefix differ by less
    than GREEDY_TIE_NATS; beam search, the paged sequence's summed log-prob is at least the
    stock one's minus BEAM_TIE_NATS (beam search maximises that sum). After a near-tie the row
    counts as agreeing (either continuation is what the model prefers); otherwise its tokens from
    the first difference on count as disagreeing, so wrong attention (which picks tokens the
    model does not prefer) fails. Every token stays in the denominator either way.
    """
    stock_logp = log_probs(model, stock, mask, prompt_len)
    paged_logp = log_probs(model, paged, mask, prompt_len)
    total = stock[:, prompt_len:].numel()
    disagree = 0
    for row in range(stock.shape[0]):
        same = (stock[row, prompt_len:] == paged[row, prompt_len:]).tolist()
        if all(same):
            continue
        first = same.index(False)
        if beams:
            tie = bool(paged_logp[row].sum() >= stock_logp[row].sum() - BEAM_TIE_NATS)
        else:
            tie = bool(abs(stock_logp[row, first] - paged_logp[row, first]) < GREEDY_TIE_NATS)
        if not tie:
            disagree += len(same) - first
    return 1 - disagree / total


@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_generate_with_flashinfer_agrees_with_stock(mode, page_size, cascade):
    model = small_llama()
    input_ids, mask = prompts()
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, num_beams=4 if mode == "beam" else 1)
    stock = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=1024 // page_size + 64, page_size=page_size, backend="flashinfer", cascade=cascade)
    paged = model.generate(input_ids, **kwargs)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    hf_paged.unwrap(model)
    assert paged.shape == stock.shape
    agreement = token_agreement(stock, paged, model, mask, input_ids.shape[1], beams=mode == "beam")
    assert agreement >= 0.99, f"{mode}: {agreement:.3f} of tokens agree"


def test_compiled_cuda_graph_decode_with_flashinfer_agrees_with_stock():
    """compile=True on CUDA: mode="reduce-overhead" (CUDA graphs), FlashInfer's CUDA-graph decode
    wrapper planned before each replay outside the graph, run inside it through the custom op."""
    from hf_paged.compile import compile_decode

    model = small_llama()
    input_ids, mask = prompts()
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


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_sliding_window_groups_with_their_own_page_size_agree_with_stock(mode):
    """FlashInfer on two groups of layers: the full one in pages of 16, the sliding one (window 16)
    in pages of 1 (window_page_size's default), planned per group, released pages left out of the
    metadata; prompts and generations well past the window."""
    model = small_gemma3()
    input_ids, mask = prompts(length=40)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, num_beams=4 if mode == "beam" else 1)
    stock = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=2048, page_size=16, backend="flashinfer")
    assert [(g.window, g.page_size) for g in model.hf_paged_runtime.groups] == [(None, 16), (16, 1)]
    paged = model.generate(input_ids, **kwargs)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    hf_paged.unwrap(model)
    agreement = token_agreement(stock, paged, model, mask, input_ids.shape[1], beams=mode == "beam")
    assert agreement >= 0.99, f"{mode}: {agreement:.3f} of tokens agree"
