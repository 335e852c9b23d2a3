"""Sentences of README.md and docs/ that no other test backs, each checked against stock or counted by
hand; each test first finds its sentence where the docs keep it (so the pointer follows the claim)."""

from pathlib import Path

import pytest
import torch

import hf_paged
from hf_paged.memory import pool as pool_module
from hf_paged.integration.compile import compile_decode

from tiny import CountingBackend, fixed_length, generate, padded_prompts, tiny_model

NEW = 8
ROOT = Path(__file__).resolve().parent.parent


def claim(page: str, sentence: str) -> None:
    """`sentence` is still said in `page` (whitespace and line breaks aside)."""
    said = " ".join((ROOT / page).read_text().split())
    assert " ".join(sentence.split()) in said, f"{page} no longer says {sentence!r}: move this test's pointer"


def test_compiled_decode_covers_sampling():
    """docs/compile.md: decode steps of greedy, sampling and beam search are compiled."""
    claim("docs/compile.md", "runs the decode steps of `generate()` (greedy, sampling, beam search,")
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    modes = [dict(do_sample=True, num_return_sequences=2, top_k=20), dict(do_sample=True, num_beams=2)]
    expected = [generate(model, input_ids, mask, seed=3, **fixed_length(NEW), **mode) for mode in modes]
    hf_paged.wrap(model, num_pages=128, page_size=4, compile=True)
    compiled = compile_decode(model, backend=CountingBackend())
    for mode, tokens in zip(modes, expected):
        before = compiled.num_compiled_steps
        assert torch.equal(generate(model, input_ids, mask, seed=3, **fixed_length(NEW), **mode), tokens), mode
        assert compiled.num_compiled_steps > before, mode


def test_the_extra_page_stays_zero():
    """docs/how-it-works.md, the pool: the page after the last is kept zero (padded reads point there)."""
    claim("docs/how-it-works.md", "The extra page stays zero.")
    model = hf_paged.wrap(tiny_model("gemma2"), num_pages=64, page_size=4)
    input_ids, mask = padded_prompts(batch=3, length=17, pads=(0, 5, 11))
    for mode in (dict(), dict(num_beams=3), dict(do_sample=True, num_return_sequences=2)):
        generate(model, input_ids, mask, **fixed_length(NEW), **mode)
        runtime = model.hf_paged_runtime
        for layer in runtime.pool.pools:
            assert not layer[:, runtime.pool.zero_page_id].any(), mode


@pytest.mark.parametrize("max_memory, fraction", [(None, 0.2), (0.05, 0.05), (1.0, 1.0)])
def test_default_and_fractional_budgets_give_the_documented_num_pages(monkeypatch, max_memory, fraction):
    """README, max_memory: None is 0.2 of available RAM on CPU; a float is that fraction of it."""
    claim("README.md", "None: 0.2 of available RAM on CPU")
    available = 3 << 30
    monkeypatch.setattr(pool_module, "free_memory_bytes", lambda device: available)
    model = hf_paged.wrap(tiny_model("llama"), page_size=16, max_memory=max_memory)
    # llama: 2 layers x (K, V) x 2 KV heads x head dim 16 x 4 bytes, 16 tokens a page
    page_bytes = 2 * 2 * 2 * 16 * 4 * 16
    assert model.hf_paged_runtime.pool.num_pages == int(fraction * available) // page_bytes
    hf_paged.unwrap(model)
    model = hf_paged.wrap(tiny_model("llama"), page_size=16, max_memory=1 << 20)  # bytes
    assert model.hf_paged_runtime.pool.num_pages == (1 << 20) // page_bytes


def test_prefix_cache_with_an_assistant_model_gives_stock_tokens_and_reads_no_page():
    """docs/prefix-caching.md: assisted decoding runs as without the cache."""
    claim("docs/prefix-caching.md", "Assisted and prompt-lookup decoding run as without the cache")
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=1)
    input_ids, mask = padded_prompts(batch=1, length=21, pads=(0,))
    kwargs = dict(assistant_model=assistant, max_new_tokens=NEW)
    expected = generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=4, prefix_cache=True)
    for _ in range(2):
        assert torch.equal(generate(model, input_ids, mask, **kwargs), expected)
    stats = hf_paged.memory_stats(model)
    assert stats["prefix_hits"] == 0 and stats["cached_pages"] == 0


def test_inputs_embeds_give_stock_tokens_without_the_prefix_cache():
    """docs/prefix-caching.md: calls with inputs_embeds run as without it (and still give stock's tokens)."""
    claim("docs/prefix-caching.md", "as do calls with `inputs_embeds` or other tensor inputs")
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    embeds = model.get_input_embeddings()(input_ids).detach()
    modes = [dict(), dict(num_beams=3)]
    expected = [model.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=0, **fixed_length(NEW), **m)
                for m in modes]
    hf_paged.wrap(model, num_pages=128, page_size=4, prefix_cache=True)
    for mode, tokens in zip(modes, expected):
        got = model.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=0, **fixed_length(NEW), **mode)
        assert torch.equal(got, tokens), mode
    assert hf_paged.memory_stats(model)["prefix_hits"] == 0
