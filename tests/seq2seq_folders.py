"""Tiny encoder-decoder models (Marian, T5) saved as folders with a tokenizer that loads offline."""

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS = 0, 1


def byte_seq2seq_tokenizer() -> PreTrainedTokenizerFast:
    """<pad>, </s>, <unk> and one token per byte; every source ends with </s>, as seq2seq tokenizers end them."""
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_config(kind: str) -> transformers.PretrainedConfig:
    """A Marian or T5 config of a few thousand parameters per layer; decoding starts from <pad>."""
    vocab = len(byte_seq2seq_tokenizer())
    common = dict(vocab_size=vocab, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    if kind == "marian":
        return transformers.MarianConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, **common,
        )
    return transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **common)


def save_tiny(kind: str, folder: Path) -> Path:
    """A random tiny `kind` ("marian" or "t5") and its tokenizer saved in `folder`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(tiny_config(kind))
    model.generation_config.max_length = None  # eval.py passes max_new_tokens
    model.save_pretrained(folder)
    byte_seq2seq_tokenizer().save_pretrained(folder)
    return folder
