"""How the GPU tests judge a kernel and a generation: shared by tests/test_gpu.py (CUDA) and
tests/test_numerics.py, which shows on CPU that the judgements fail a deliberately wrong result.

Attention outputs are compared per (token, head) with the relative error of the output vector,
`||actual - reference|| / ||reference||`, against a float64 reference (the torch executor on a
float64 copy of the same pool). An output averages its row's values (N(0, 1) here) with softmax
weights; dropping or duplicating one of L roughly equally weighted keys moves it by about 1/sqrt(L)
of its norm (0.03 at L = 1000), and by up to its whole norm when that key dominates the scores.
A 16-bit kernel that accumulates in float32 stays within a few unit roundoffs: the softmax weights
and the output are each rounded once. An absolute tolerance (the old `atol=2e-2`) instead passes a
dropped key in any row longer than a few hundred tokens: the outputs there are far below 1.
"""

import torch

from hf_paged.attention import LayerParams, TorchExecutor
from hf_paged.attention.metadata import ForwardMetadata, build_metadata
from hf_paged.memory.kv_quant import as_bytes
from hf_paged.memory.pool import KVPool, copy_pages
from hf_paged.memory.tables import PageTables

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
    # Scores of standard deviation sqrt(head_dim): each query's top key takes most of the weight, so
    # one key read wrongly (an off-by-one at a mask edge, a stale page) moves the output by its norm.
    "peaked": {"sm_scale": 1.0},
}


def relative_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted per-(token, head) relative error for outputs in `dtype`: 2 machine epsilons
    (4 unit roundoffs: 0.016 for bfloat16, 0.002 for float16)."""
    return 2 * torch.finfo(dtype).eps


def layer_params(num_qo_heads: int, num_kv_heads: int, head_dim: int, variant: str) -> LayerParams:
    settings = dict(VARIANTS[variant])
    sm_scale = settings.pop("sm_scale", head_dim**-0.5)
    return LayerParams(num_qo_heads, num_kv_heads, head_dim, sm_scale, **settings)


def write_tokens(pool: KVPool, slots: list[int], generator: torch.Generator) -> None:
    """Random K/V (N(0, 1)) for the tokens at `slots` of the single layer's pool, as the cache writes them
    (fp8 pages: rounded to fp8 and written as bytes; read back they are stored x the layer's scales)."""
    layer = pool.pools[0]
    num_kv_heads, head_dim = layer.shape[-2:]
    slot = torch.tensor(slots, dtype=torch.int64, device=layer.device)
    flat = as_bytes(layer).view(2, -1, num_kv_heads, head_dim)
    for plane in (0, 1):
        values = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator, device=layer.device)
        flat[plane].index_copy_(0, slot, as_bytes(values.to(layer.dtype)))


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


def reference_output(q: torch.Tensor, pool: KVPool, meta: ForwardMetadata, params: LayerParams) -> torch.Tensor:
    """The torch executor in float64 on float64 copies of `q` [nnz, H_q, D] and the pool: [nnz, H_q, D]."""
    executor = TorchExecutor()
    return executor.run(q.double(), pool.pools[0].double(), executor.plan(meta, params, pool))


def relative_errors(actual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[nnz, H_q] `||actual - reference|| / ||reference||` over the head dimension (float64)."""
    difference = (actual.double() - reference.double()).norm(dim=-1)
    return difference / reference.double().norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)


def assert_matches_reference(actual: torch.Tensor, reference: torch.Tensor, what: str = "") -> None:
    """Every (token, head) output within relative_tolerance(actual.dtype) of the float64 reference."""
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    errors = relative_errors(actual, reference)
    tolerance = relative_tolerance(actual.dtype)
    worst = int(errors.flatten().argmax())
    token, head = divmod(worst, errors.shape[1])
    assert bool((errors <= tolerance).all()), (
        f"{what}: relative error {float(errors.max()):.4f} at token {token}, head {head} "
        f"(tolerance {tolerance:.4f} for {actual.dtype}); {int((errors > tolerance).sum())} outputs over"
    )


# -- generate(): token agreement --------------------------------------------------------------------

GREEDY_TIE_NATS = 0.03  # log-prob margins below this are decided by bf16 rounding (measured noise <= 0.01)
BEAM_TIE_NATS = 0.1  # summed over a row's new tokens: 0.01 per token of rounding, random in sign


@torch.no_grad()
def log_probs(model: torch.nn.Module, sequences: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[rows, new tokens, vocab] float32 log-probs at each generated position under `model`
    (teacher forcing on `sequences` [rows, prompt_len + new tokens], prompt mask `mask`).

    The EOS token is left out, as generate() does with min_new_tokens equal to max_new_tokens (every
    token-agreement test forces its length): the choice it judges is among the other tokens.
    """
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(sequences, attention_mask=full_mask, position_ids=position_ids).logits.float()
    eos = model.generation_config.eos_token_id
    if eos is not None:
        logits[..., eos] = float("-inf")
    return logits[:, prompt_len - 1 : -1].log_softmax(-1)


def token_agreement(stock, paged, model, mask, prompt_len: int, beams: bool) -> float:
    """Fraction of all generated tokens (rows x new tokens) that the unwrapped `model` accepts.

    Greedy: every generated token of the paged sequence is judged on its own, by teacher forcing on
    the paged sequence: it agrees when its log-prob is within GREEDY_TIE_NATS of the best token's
    there. Tokens equal to stock's pass this too; after a near-tie the paged row continues on its own
    prefix, and each of its later tokens must again be the model's choice on that prefix (nothing is
    forgiven after a tie). Beam search: a row that differs from stock agrees only if its summed
    log-prob is within BEAM_TIE_NATS of stock's row (beam search maximises that sum; two beams of a
    random model can tie that closely, a wrong attention's cannot); else its tokens from the first
    difference on disagree.
    """
    paged_logp = log_probs(model, paged, mask, prompt_len)
    new_tokens = paged[:, prompt_len:]
    chosen = paged_logp.gather(-1, new_tokens[..., None]).squeeze(-1)
    total = new_tokens.numel()
    if not beams:
        margins = paged_logp.max(-1).values - chosen
        return 1 - int((margins >= GREEDY_TIE_NATS).sum()) / total
    stock_logp = log_probs(model, stock, mask, prompt_len)
    stock_chosen = stock_logp.gather(-1, stock[:, prompt_len:, None]).squeeze(-1)
    disagree = 0
    for row in range(stock.shape[0]):
        same = (stock[row, prompt_len:] == new_tokens[row]).tolist()
        if all(same):
            continue
        if abs(float(chosen[row].sum() - stock_chosen[row].sum())) >= BEAM_TIE_NATS:
            disagree += len(same) - same.index(False)
    return 1 - disagree / total


# The generate tests' model and prompts (tests/test_gpu.py, and tests/tp_gpu_worker.py under TP).
GPU_VOCAB = 64
GPU_NEW_TOKENS = 32


def gpu_prompts(device: torch.device, batch: int = 4, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts `[batch, length]` int64 on `device` and their mask (rows padded 0, 7, 0, 15)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, GPU_VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, pads in enumerate([0, 7, 0, 15][:batch]):
        input_ids[row, :pads], mask[row, :pads] = 0, 0
    return input_ids.to(device), mask.to(device)


# The trained default model (hf_paged/data/default_model): the half-precision generate tests that
# need a real next-token distribution (a random model's is flat: every rounding flips a near-tie).
def default_model_and_prompts(device: torch.device, dtype: torch.dtype, batch: int = 8):
    """(default model in `dtype` on `device`, left-padded prompts `[batch, longest]` int64, their mask):
    the first `batch` prompts of the built-in task (held-out functions' signatures and docstrings)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_paged.evaluation import default_model_path
    from hf_paged.evaluation.data import BUNDLED_DATA

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), padding_side="left")
    texts = [json.loads(line)["prompt"] for line in BUNDLED_DATA.read_text().splitlines()[:batch]]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=dtype).to(device).eval()
    return model, encoded.input_ids.to(device), encoded.attention_mask.to(device)
