"""Train hf_paged's default model: a small Llama-style code model on the Python standard library's source.

The shipped checkpoint (hf_paged/data/default_model/) was made by

    PYTHONPATH=. python scripts/train_default_model.py --output-dir hf_paged/data/default_model

on CPython 3.11.7's standard library, torch 2.13.0 (CPU), tokenizers 0.23.3, transformers 5.25.0,
2 CPU cores shared with other jobs (98 minutes under a load of 4 to 21; about 30 alone). The same
command with the same versions, thread count and CPU gives the same weights; other thread counts or
CPUs change the floating-point reduction order, so the last bits can differ.
`--dry-run` trains 3 steps on 40 files (a minute) to check the script end to end.

Settings (the defaults of the flags below):
- Text: every .py file of `sysconfig.get_paths()["stdlib"]` except tests, third-party packages,
  codec tables, pydoc's help text and the held-out modules of hf_paged.evaluation.corpus
  (HELD_OUT_MODULES: bisect, calendar, colorsys, difflib, fnmatch, fractions, gettext, glob,
  graphlib, heapq, ipaddress, sched, shlex, statistics, textwrap), which are never trained on,
  tokenizer included. Each file is BOS + its tokens + EOS; files are joined and cut into windows of
  512 tokens, shuffled with the seed.
- Tokenizer: byte-level BPE trained with `tokenizers` on the same files, vocabulary 4096 with
  <pad> (0), <s> (1, BOS, prepended to every encoded text), </s> (2, EOS).
- Model: LlamaForCausalLM, hidden 256, 4 layers, 4 query heads and 2 KV heads (GQA) of head dim 64
  (served by FlashInfer's kernels on a GPU; the KV heads divide by 2 for `--tp 2`), MLP 640, RoPE
  (theta 10000), tied embeddings, 512 positions: 3.8M parameters, saved in bfloat16.
- Training: AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1), 30 warm-up steps then cosine decay
  to 10%, gradient clipping at 1.0, batches of 4 windows x 512 tokens, 400 steps (0.82M tokens), fp32,
  seed 0. The loss is logged every 25 steps; the held-out perplexity is measured at the end and
  written with the settings to training.json in the output folder.
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_paged.evaluation.corpus import HELD_OUT_MODULES, module_files, read_source, stdlib_dir, training_files
from hf_paged.evaluation.perplexity import perplexity, token_stream

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="folder for the checkpoint and tokenizer")
    parser.add_argument("--stdlib", type=Path, default=None, help="standard library folder (default: this Python's)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512, help="tokens per training window (and max positions)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=640)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to train, e.g. cuda (the shipped model: cpu)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--dry-run", action="store_true", help="3 steps on 40 files: checks the script end to end")
    return parser


def train_tokenizer(texts: list[str], vocab_size: int, context: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` ids (3 special tokens first), BOS prepended, left padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left",
        model_max_length=context,
    )


def model_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads, max_position_embeddings=args.context, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of --lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def windows(stream: list[int], context: int) -> torch.Tensor:
    """[num_windows, context] int64: the stream cut into whole windows (the tail is dropped)."""
    count = len(stream) // context
    return torch.tensor(stream[: count * context], dtype=torch.long).view(count, context)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup_steps, args.log_every = 3, 1, 1
    started = time.time()
    torch.manual_seed(args.seed)
    root = args.stdlib or stdlib_dir()
    files = training_files(root)[: 40 if args.dry_run else None]
    texts = [text for text in map(read_source, files) if text]
    held_out = [text for name in HELD_OUT_MODULES for text in map(read_source, module_files(name, root)) if text]
    print(f"{len(texts)} training files ({sum(map(len, texts)) / 1e6:.1f} MB) from {root}; "
          f"held out: {', '.join(HELD_OUT_MODULES)}", flush=True)

    tokenizer = train_tokenizer(texts, args.vocab_size, args.context)
    data = windows(token_stream(tokenizer, texts), args.context)
    print(f"tokenizer: {len(tokenizer)} ids; {data.numel() / 1e6:.2f}M training tokens in {len(data)} windows "
          f"({time.time() - started:.0f} s)", flush=True)

    model = LlamaForCausalLM(model_config(args, tokenizer)).to(args.device)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=generator)
    cursor, log = 0, []
    model.train()
    progress = tqdm(range(args.steps), desc="train", unit="step", mininterval=10)
    for step in progress:
        if cursor + args.batch_size > len(order):  # next epoch: a new order
            order, cursor = torch.randperm(len(data), generator=generator), 0
        batch = data[order[cursor : cursor + args.batch_size]].to(args.device)  # [batch, context]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": learning_rate(step, args),
                        "seconds": round(time.time() - started)})
            print(f"step {step}: loss {loss.item():.4f}, lr {learning_rate(step, args):.2e}, "
                  f"{time.time() - started:.0f} s", flush=True)

    model.eval()
    held_out_texts = held_out[:2] if args.dry_run else held_out
    measured = perplexity(model, tokenizer, held_out_texts, context=args.context)
    print(f"held-out perplexity (fp32): {measured['perplexity']:.2f} over {measured['num_tokens']} tokens", flush=True)

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to("cpu", torch.bfloat16).save_pretrained(output)
    tokenizer.save_pretrained(output)
    record = {
        "command": "python scripts/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "held_out_modules": list(HELD_OUT_MODULES),
        "num_training_files": len(texts),
        "num_training_tokens": data.numel(),
        "num_parameters": num_parameters,
        "held_out_perplexity_fp32": measured,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "seconds": round(time.time() - started),
        "log": log,
    }
    (output / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output} ({record['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
