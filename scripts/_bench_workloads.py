"""Workloads, the random-weight model and the inputs of scripts/bench.py."""

import copy
from dataclasses import asdict, dataclass, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD_TOKEN_ID = 0


@dataclass(frozen=True, slots=True)
class Workload:
    """One generate() call shape. `min_prompt_len < prompt_len` makes left-padded ragged prompts."""

    name: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    num_return_sequences: int = 1
    min_prompt_len: int | None = None

    @property
    def rows(self) -> int:
        """Rows generate() runs: batch * max(num_beams, num_return_sequences)."""
        return self.batch_size * max(self.num_beams, self.num_return_sequences)

    @property
    def returned_rows(self) -> int:
        return self.batch_size * self.num_return_sequences

    def as_dict(self) -> dict:
        return asdict(self)


WORKLOADS: dict[str, Workload] = {
    "summarize": Workload("summarize", 4, 512, 64, num_beams=4),
    "wide-beam": Workload("wide-beam", 1, 512, 64, num_beams=16),
    "multi-sample": Workload("multi-sample", 2, 512, 64, do_sample=True, num_return_sequences=8),
    "greedy": Workload("greedy", 8, 128, 256),
    "ragged": Workload("ragged", 4, 512, 64, num_beams=4, min_prompt_len=100),
}


def quick(workload: Workload) -> Workload:
    """A tiny version of `workload` for smoke tests: same decoding mode, few tokens."""
    return replace(
        workload,
        batch_size=min(workload.batch_size, 2),
        prompt_len=24,
        new_tokens=4,
        min_prompt_len=None if workload.min_prompt_len is None else 9,
    )


def select_workloads(names: str, sizes: dict, is_quick: bool) -> list[Workload]:
    """Workloads named in `names` ("all" or comma-separated), with size flags (not None) applied."""
    if names == "none":  # e.g. only the few-shot workload (--prefix-cache)
        return []
    chosen = list(WORKLOADS) if names == "all" else [n.strip() for n in names.split(",")]
    unknown = [n for n in chosen if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; expected 'all' or some of {list(WORKLOADS)}")
    out = []
    for name in chosen:
        workload = quick(WORKLOADS[name]) if is_quick else WORKLOADS[name]
        workload = replace(workload, **{k: v for k, v in sizes.items() if v is not None})
        if workload.min_prompt_len is not None and workload.min_prompt_len > workload.prompt_len:
            workload = replace(workload, min_prompt_len=workload.prompt_len)
        out.append(workload)
    return out


def build_model_pair(args, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two Llama-style models sharing one set of random weights: stock (sdpa) and the one to wrap.

    The second model's parameters are the first's tensors (no copy), so weights cost memory once.
    """
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=None,
    )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    stock = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    stock = stock.to(device).eval()
    paged = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    paged.load_state_dict(stock.state_dict(), assign=True)
    paged = paged.to(device).eval()
    for model in (stock, paged):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = PAD_TOKEN_ID
    return stock, paged


def make_inputs(workload: Workload, vocab: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask `[batch, prompt_len]` int64; ragged prompts are left-padded."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = workload.batch_size, workload.prompt_len
    input_ids = torch.randint(1, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if workload.min_prompt_len is not None:
        lengths = torch.linspace(workload.min_prompt_len, length, batch).round().long()
        for row, real in enumerate(lengths.tolist()):
            input_ids[row, : length - real] = PAD_TOKEN_ID
            attention_mask[row, : length - real] = 0
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def generate_kwargs(workload: Workload, new_tokens: int | None = None) -> dict:
    """generate() arguments shared by both sides: the full length always, no early stop."""
    n = workload.new_tokens if new_tokens is None else new_tokens
    kwargs = dict(
        max_new_tokens=n,
        min_new_tokens=n,
        num_beams=workload.num_beams,
        do_sample=workload.do_sample,
        num_return_sequences=workload.num_return_sequences,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=None,
    )
    if workload.num_beams > 1:
        kwargs["early_stopping"] = True
    return kwargs


def pages_needed(workload: Workload, page_size: int) -> int:
    """Pool pages that hold every row's tokens with no sharing at all (a safe pool size)."""
    per_row = -(-(workload.prompt_len + workload.new_tokens) // page_size) + 1
    return workload.rows * per_row + workload.batch_size * (-(-workload.prompt_len // page_size))
