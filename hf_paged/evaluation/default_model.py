"""The built-in model of scripts/eval.py: a seeded random-weight Llama and a byte tokenizer, no download."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
DEFAULT_MODEL_NAME = "builtin:tiny-random-llama"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 3 special tokens + one token per byte (259 ids), left padding.

    Any text round-trips through encode/decode; ids it decodes that are not valid UTF-8 become U+FFFD.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1024,
    )


def tiny_llama(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-weight Llama (hidden 128, 2 layers, 2 query / 1 KV heads of dim 64, 1024 positions), seeded.

    The same seed gives the same weights in every process, so data-parallel runs agree. Head dim 64
    keeps it servable by FlashInfer's kernels on a GPU (with --dtype bfloat16 or float16).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
