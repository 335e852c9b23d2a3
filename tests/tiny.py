"""Tiny random models of every family the tests claim, built from configs (no hub)."""

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
    config = (CONFIGS.get(family) or RELEASE_DEPENDENT_CONFIGS[family])()
    return AutoModelForCausalLM.from_config(config).eval()


def padded_prompts(batch: int = 2, length: int = 13, pads: tuple[int, ...] = (0, 4), seed: int = 1):
    """Left-padded prompts `[batch, length]` int64 and their mask; row i has `pads[i]` pads."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, num_pads in enumerate(pads[:batch]):
        input_ids[row, :num_pads] = 0
        mask[row, :num_pads] = 0
    return input_ids, mask


class Interrupt(StoppingCriteria):
    """A stopping criterion that raises `error` at its `at`-th step, as a user's criterion (or Ctrl-C) may."""

    def __init__(self, at: int, error: type[BaseException] = KeyboardInterrupt):
        self.at, self.calls, self.error = at, 0, error

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("stopped by the test")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
