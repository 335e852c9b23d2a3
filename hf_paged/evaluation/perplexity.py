"""Perplexity of a causal LM on source files: each file is BOS + its tokens + EOS, files are joined
into one stream and cut into windows of the model's context; every token after a window's first is
scored (teacher forcing, no overlap between windows)."""

import math
from pathlib import Path

import torch


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The ids of `texts`, each as BOS + tokens + EOS (how the default model was trained), joined."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id]
    return ids


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, texts: list[str], context: int = 512, batch_size: int = 8) -> dict:
    """{"perplexity", "loss" (mean nats per scored token), "num_tokens" (scored)} of `model` on `texts`.

    Windows of `context` tokens [batch_size, context] int64 go through the model in batches; the
    last window may be shorter. Each window scores its tokens after the first.
    """
    stream = token_stream(tokenizer, texts)
    windows = [stream[start : start + context] for start in range(0, len(stream), context)]
    windows = [window for window in windows if len(window) > 1]
    device = model.get_input_embeddings().weight.device
    total_nats, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        longest = max(len(window) for window in batch)
        input_ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        for row, window in enumerate(batch):
            input_ids[row, : len(window)] = torch.tensor(window)
            labels[row, : len(window)] = torch.tensor(window)
        logits = model(input_ids=input_ids.to(device)).logits.float()  # [batch, longest, vocab]
        targets = labels[:, 1:].to(device)
        nats = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum")
        total_nats += float(nats)
        total_tokens += int((targets != -100).sum())
    loss = total_nats / max(total_tokens, 1)
    return {"perplexity": math.exp(loss), "loss": loss, "num_tokens": total_tokens}


def read_files(paths: list[Path]) -> list[str]:
    """The UTF-8 text of each file (files that are not UTF-8 are left out)."""
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts
