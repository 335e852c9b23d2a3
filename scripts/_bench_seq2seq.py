"""The encoder-decoder workloads of scripts/bench.py (`--seq2seq`): translation, summarization, speech.

Three shapes of issue 29, each on a random-weight model of its family (fp32):

  translation    Marian,  source 60 tokens,      target 60,  6 beams
  summarization  BART,    source 1,024 tokens,   target 142, 4 beams
  speech         Whisper, 1,500 encoder frames,  target 100, 5 beams

Stock generate() expands the encoder output once per beam, so every row computes and keeps its own
copy of every decoder layer's cross-attention K/V, and reorders it at every beam step: it holds
rows x (source + target) tokens. The limit keeps the cross-attention K/V once per input plus each
row's own decoder tokens: rows x target + inputs x source; the workload prints limit / stock.

Stock KV is the most its EncoderDecoderCache (self- plus cross-attention) held after any forward
(a forward hook, as for the causal workloads); the pool peak is what the wrapped model's page ids
reserved at one instant, inside forwards too (`memory_stats()["peak_pool_bytes"]`). Times are
medians of stock and paged alternated in this process; tokens must be the same. With
`--kv-cache-dtype fp8_e4m3` / `fp8_e5m2` the pages (self- and cross-attention) hold fp8: the pool
peak halves (against bf16 pages; a quarter of fp32's), tokens may differ from stock's (rounded K/V)
and the targets are not applied.
"""

import copy
import statistics
from dataclasses import asdict, dataclass, replace

import torch
import transformers

import hf_paged
from _bench_measure import timed_generate
from hf_paged import _compat
from hf_paged.evaluation.runner import stock_cache_bytes

PAD, START = 0, 1
TOLERANCE = 0.05  # target: the pool peak / stock KV at most this above the limit (issue 29)


@dataclass(frozen=True, slots=True)
class Seq2SeqWorkload:
    name: str
    model: str  # marian, bart or whisper
    source_len: int  # source tokens (encoder positions for speech: 2 mel frames each)
    target_len: int  # new tokens per row
    num_beams: int
    batch_size: int = 1

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_beams

    @property
    def limit(self) -> float:
        """(rows x target + inputs x source) / (rows x (source + target)): cross-attention K/V once per input."""
        return (self.rows * self.target_len + self.batch_size * self.source_len) / (
            self.rows * (self.source_len + self.target_len))


SEQ2SEQ = [
    Seq2SeqWorkload("translation", "marian", 60, 60, 6, batch_size=2),
    Seq2SeqWorkload("summarization", "bart", 1024, 142, 4),
    Seq2SeqWorkload("speech", "whisper", 1500, 100, 5),
]
# A tiny model of each family: d_model x layers (encoder and decoder each), heads, FFN, vocabulary.
SIZES = dict(d_model=256, layers=3, heads=4, ffn=1024, vocab=8000)
QUICK_SIZES = dict(d_model=64, layers=2, heads=4, ffn=128, vocab=512)


def quick(workload: Seq2SeqWorkload) -> Seq2SeqWorkload:
    return replace(workload, source_len=min(workload.source_len, 40), target_len=8)


def build_config(workload: Seq2SeqWorkload, sizes: dict) -> transformers.PretrainedConfig:
    d, layers, heads, ffn, vocab = (sizes[key] for key in ("d_model", "layers", "heads", "ffn", "vocab"))
    common = dict(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                  decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, pad_token_id=PAD,
                  bos_token_id=START, eos_token_id=None, decoder_start_token_id=START, forced_eos_token_id=None)
    if workload.model == "marian":
        return transformers.MarianConfig(max_position_embeddings=max(512, workload.source_len), **common)
    if workload.model == "bart":
        return transformers.BartConfig(max_position_embeddings=max(1024, workload.source_len), **common)
    return transformers.WhisperConfig(num_mel_bins=80, max_source_positions=workload.source_len,
                                      max_target_positions=max(448, workload.target_len + 1), begin_suppress_tokens=None,
                                      suppress_tokens=None, **common)


def build_pair(workload: Seq2SeqWorkload, sizes: dict, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stock and to-be-wrapped models sharing one set of random weights (fp32, eager generation settings)."""
    config = build_config(workload, sizes)
    torch.manual_seed(seed)
    stock = transformers.AutoModelForSpeechSeq2Seq.from_config(copy.deepcopy(config)) if workload.model == "whisper" \
        else transformers.AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config))
    paged = type(stock)(copy.deepcopy(config))
    paged.load_state_dict(stock.state_dict(), assign=True)
    for model in (stock, paged):
        model.eval()
        model.generation_config = transformers.GenerationConfig(
            decoder_start_token_id=START, pad_token_id=PAD, bos_token_id=START, eos_token_id=None)
    return stock, paged


def make_inputs(workload: Seq2SeqWorkload, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids `[batch, source_len]` int64, or log-mel features `[batch, 80, 2 * source_len]` fp32 for speech."""
    generator = torch.Generator().manual_seed(seed)
    if workload.model == "whisper":
        return {"input_features": torch.randn((workload.batch_size, 80, 2 * workload.source_len), generator=generator)}
    input_ids = torch.randint(2, vocab, (workload.batch_size, workload.source_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def generate_kwargs(workload: Seq2SeqWorkload) -> dict:
    n = workload.target_len
    return dict(max_new_tokens=n, min_new_tokens=n, num_beams=workload.num_beams, early_stopping=True,
                pad_token_id=PAD, eos_token_id=None)


def stock_peak_kv(model, inputs: dict, kwargs: dict, seed: int) -> tuple[torch.Tensor, int]:
    """Run stock generate() once; the largest bytes its cache (self- plus cross-attention) held after any forward."""
    peak = 0

    def hook(module, args, output):
        nonlocal peak
        cache = _compat.output_cache(output)
        if cache is not None:
            peak = max(peak, stock_cache_bytes(cache))

    handle = model.register_forward_hook(hook)
    try:
        sequences, _ = timed_generate(model, inputs, kwargs, seed, torch.device("cpu"))
    finally:
        handle.remove()
    return sequences, peak


def pages_needed(workload: Seq2SeqWorkload, page_size: int) -> int:
    """A pool that holds every row's decoder tokens and every row's own copy of the source: no sharing needed."""
    return workload.rows * (-(-(workload.source_len + workload.target_len + 1) // page_size) + 2)


def measure_seq2seq(workload: Seq2SeqWorkload, args, is_quick: bool, apply_target: bool) -> dict:
    workload = quick(workload) if is_quick else workload
    sizes = QUICK_SIZES if is_quick else SIZES
    stock, paged = build_pair(workload, sizes, args.seed)
    inputs, kwargs = make_inputs(workload, sizes["vocab"], args.seed), generate_kwargs(workload)
    stock_tokens, stock_kv = stock_peak_kv(stock, inputs, kwargs, args.seed)
    hf_paged.wrap(paged, page_size=args.page_size, num_pages=args.num_pages or pages_needed(workload, args.page_size),
                  kv_cache_dtype=args.kv_cache_dtype)
    paged_tokens, _ = timed_generate(paged, inputs, kwargs, args.seed, torch.device("cpu"))
    stats = hf_paged.memory_stats(paged)
    times = {"stock": [], "paged": []}
    for _ in range(max(1, args.reps)):
        for side, model in (("stock", stock), ("paged", paged)):
            times[side].append(timed_generate(model, inputs, kwargs, args.seed, torch.device("cpu"))[1])
    seconds = {side: statistics.median(values) for side, values in times.items()}
    pool_ratio = stats["peak_pool_bytes"] / stock_kv
    match = bool(torch.equal(stock_tokens, paged_tokens))
    meets = None
    if apply_target and not is_quick:
        # Within the tolerance above the limit (beams that still share their first decoder page may even go below it).
        meets = bool(match and pool_ratio <= workload.limit + TOLERANCE and seconds["paged"] < seconds["stock"])
    return {
        "workload": asdict(workload),
        "model": {"family": workload.model, **sizes},
        "rows": workload.rows,
        "stock_kv_bytes": stock_kv,
        "paged_pool_bytes": stats["peak_pool_bytes"],
        "pool_ratio": pool_ratio,
        "limit": workload.limit,
        "page_size": stats["page_size"],
        "kv_cache_dtype": args.kv_cache_dtype,
        # memory_stats() counts the two kinds apart (None where a release of hf_paged does not)
        "peak_self_attention_pages": stats.get("peak_self_attention_pages"),
        "peak_cross_attention_pages": stats.get("peak_cross_attention_pages"),
        "page_bytes": stats["page_bytes"],
        "memory_stats": stats,
        "seconds": seconds,
        "times_s": times,
        "time_ratio": seconds["paged"] / seconds["stock"],
        "tokens_match": match,
        "meets_target": meets,
    }


def print_seq2seq(results: list[dict]) -> None:
    pages = results[0]["kv_cache_dtype"] if results else "auto"
    print(f"\nencoder-decoder models (cross-attention K/V once per input; pages: {pages})")
    header = (f"{'workload':<14}{'shape (src/tgt/beams x inputs)':<32}{'stock KV':>10}{'pool peak':>11}{'pool/stock':>11}"
              f"{'limit':>7}{'stock s':>9}{'paged s':>9}{'t ratio':>8}  match  ok")
    print(header)
    print("-" * len(header))
    for r in results:
        w = r["workload"]
        shape = f"{w['source_len']}/{w['target_len']}/{w['num_beams']} x {w['batch_size']} ({w['model']})"
        ok = {True: "yes", False: "NO", None: "-"}[r["meets_target"]]
        print(f"{w['name']:<14}{shape:<32}{r['stock_kv_bytes'] / 2**20:>9.2f}M{r['paged_pool_bytes'] / 2**20:>10.2f}M"
              f"{r['pool_ratio']:>11.3f}{r['limit']:>7.3f}{r['seconds']['stock']:>9.3f}{r['seconds']['paged']:>9.3f}"
              f"{r['time_ratio']:>8.2f}  {str(r['tokens_match']):<6} {ok}")
    for r in results:
        if r["peak_cross_attention_pages"] is not None:
            print(f"{r['workload']['name']}: peak {r['peak_self_attention_pages']} self-attention + "
                  f"{r['peak_cross_attention_pages']} cross-attention pages of {r['page_size']} tokens ({r['page_bytes']} B)")
    print(f"(limit: (rows x target + inputs x source) / (rows x (source + target)); target: pool/stock at most "
          f"{TOLERANCE} above it, time below stock's, same tokens)")
