"""Shared test helpers: tiny random models of every family the tests claim (built from configs, no
hub), padded prompts, the one seed-and-generate wrapper and the decoding modes the tests compare.

Pool/metadata builders and dense references live in reference.py, the FlashInfer stand-in in
stand_in.py, the thread helper in threads.py. Test modules import
these helpers, never each other.
"""

import torch
import transformers
from transformers import AutoModelForCausalLM, StoppingCriteria

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, **COMMON),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=5, **COMMON),
    "qwen2": lambda: transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=1, **COMMON
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **COMMON
    ),
    "phi3": lambda: transformers.Phi3Config(**SMALL, **COMMON),
    # Its config's window is only the cache's (stock's DynamicCache(config) keeps the last 3 tokens);
    # its attention applies none.
    "moshi": lambda: transformers.MoshiConfig(**SMALL, head_dim=16, ffn_dim=128, sliding_window=4, **COMMON),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, **COMMON),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **COMMON
    ),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, **COMMON
    ),
}

# Families whose attention routes through transformers' attention interface only in some releases
# (GPT-J and CodeGen since 5.24): wrap() serves them through the interface there and through hf_paged.patches elsewhere.
RELEASE_DEPENDENT_CONFIGS = {
    "gptj": lambda: transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **COMMON),
    "codegen": lambda: transformers.CodeGenConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **COMMON),
}

FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **COMMON)

# Families whose attention bypasses the attention interface (Falcon: before 5.25, see ROUTED_FROM):
# wrap() serves them through hf_paged.patches.
PATCHED_CONFIGS = {
    "xglm": lambda: transformers.XGLMConfig(
        d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, max_position_embeddings=64, **COMMON
    ),
    "gpt_neox_japanese": lambda: transformers.GPTNeoXJapaneseConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
        max_position_embeddings=64, **COMMON
    ),
    "mpt": lambda: transformers.MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, **COMMON),
    "mpt_clip_qkv_6_heads": lambda: transformers.MptConfig(
        d_model=48, n_heads=6, n_layers=2, max_seq_len=64, attn_config=dict(clip_qkv=0.5, softmax_scale=0.3), **COMMON
    ),
    "falcon": lambda: transformers.FalconConfig(**FALCON),  # multi-query (one KV head)
    "falcon_mha": lambda: transformers.FalconConfig(**FALCON, multi_query=False, num_kv_heads=4),
    "falcon_new_arch": lambda: transformers.FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2),
    "bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **COMMON),
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        hidden_size=64, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]], window_size=5,
        max_position_embeddings=64, **COMMON
    ),
}

ALL_CONFIGS = {**CONFIGS, **RELEASE_DEPENDENT_CONFIGS, **PATCHED_CONFIGS}

# The decoding modes every token-for-token comparison runs (each call seeds torch first, so sampling
# draws the same numbers wrapped and unwrapped).
MODES = {
    "greedy": dict(),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=20),
    "beam": dict(num_beams=4, num_return_sequences=2),
    "beam_sample": dict(num_beams=3, do_sample=True),
}
BASIC_MODES = {mode: MODES[mode] for mode in ("greedy", "sample", "beam")}


# The first release whose modeling code routes each family's attention through the attention
# interface (read off each release's source by hand and written down here, so that no test takes its
# expectation from `_compat.routes_through_interface`, the code under test). Before it, hf_paged.patches
# serves the family; None: no supported release routes it. Families not listed always route.
ROUTED_FROM = {
    "gptj": (5, 24), "codegen": (5, 24), "falcon": (5, 25),
    "bloom": None, "gpt_neo": None, "gpt_neox_japanese": None, "mpt": None, "xglm": None,
}


def routes_through_interface(model_type: str) -> bool:
    """Whether the installed transformers routes `model_type`'s attention through the interface."""
    from packaging.version import Version

    if model_type not in ROUTED_FROM:
        return True
    first = ROUTED_FROM[model_type]
    return first is not None and Version(transformers.__version__).release[:2] >= first


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(ALL_CONFIGS[family]()).eval()


def with_eos_mid_sequence(family: str, step: int = 3, **prompts):
    """A tiny model whose EOS is the token greedy decoding emits at new token `step` of row 0 (tiny
    random models never emit their configured EOS), and its prompts (padded_prompts(**prompts))."""
    model = tiny_model(family)
    input_ids, mask = padded_prompts(**prompts)
    greedy = generate(model, input_ids, mask, use_cache=True, **fixed_length(step + 1))
    model.generation_config.eos_token_id = int(greedy[0, input_ids.shape[1] + step])
    return model, input_ids, mask


def padded_prompts(batch: int = 2, length: int = 13, pads: tuple[int, ...] = (0, 4), seed: int = 1):
    """Left-padded prompts `[batch, length]` int64 and their mask; row i has `pads[i]` pads."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, num_pads in enumerate(pads[:batch]):
        input_ids[row, :num_pads] = 0
        mask[row, :num_pads] = 0
    return input_ids, mask


def left_padded(prompts: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of their own lengths as one left-padded batch `[len(prompts), width]` (default: the
    longest) int64, pad id 0, and its mask."""
    width = width or max(len(prompt) for prompt in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate(model, input_ids, mask, seed: int | None = 0, **kwargs):
    """`model.generate` on left-padded prompts `[batch, length]`, torch seeded with `seed` first (None:
    not seeded, for threads that must not reseed the shared generator); pad token 0."""
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("pad_token_id", 0)
    return model.generate(input_ids, attention_mask=mask, **kwargs)


def fixed_length(new_tokens: int, **kwargs) -> dict:
    """Keyword arguments for exactly `new_tokens` new tokens per row (tiny models rarely emit EOS)."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)


class Interrupt(StoppingCriteria):
    """A stopping criterion that raises `error` at its `at`-th step, as a user's criterion (or Ctrl-C) may."""

    def __init__(self, at: int, error: type[BaseException] = KeyboardInterrupt):
        self.at, self.calls, self.error = at, 0, error

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("stopped by the test")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.num_graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.num_graphs += 1
        return gm.forward


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer: <pad>, <s>, </s> (ids 0-2, as COMMON) + one token per byte, BOS prepended.

    For tests that need text (stop strings) on the tiny models: ids below VOCAB decode to bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(("<pad>", "<s>", "</s>"))}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left",
    )
