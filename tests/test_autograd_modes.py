"""Pools made inside torch.inference_mode() serve calls outside it, and your own forward runs in grad mode (issue 34)."""

import copy
import io
import sys

import pytest
import torch
from transformers import DynamicCache

import hf_paged
from hf_paged import PagedCache
from hf_paged.cache.forward import GRADIENT_ERROR

from tiny import fixed_length, generate, padded_prompts, tiny_model

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def prompts():
    return padded_prompts(batch=2, pads=(0, 4))


def stock_tokens(model, prompts, **kwargs):
    """Tokens of an unwrapped copy of `model` (at its dtype), greedy and beam search."""
    stock = hf_paged.unwrap(copy.deepcopy(model))
    return generate(stock, *prompts, **fixed_length(NEW_TOKENS), **kwargs)


def assert_serves_outside_and_inside(model, prompts, expected, **kwargs):
    """generate() outside inference_mode, then inside, then outside again: stock's tokens each time."""
    for mode in (False, True, False):
        with torch.inference_mode(mode):
            assert torch.equal(generate(model, *prompts, **fixed_length(NEW_TOKENS), **kwargs), expected)
    runtime = model.hf_paged_runtime
    assert not any(piece.is_inference() for piece in runtime.pool.slices)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == stats.get("cached_pages", 0)  # the prefix cache keeps its pages


@pytest.mark.parametrize("settings", [dict(), dict(prefix_cache=True), dict(num_beams=3)])
def test_a_model_wrapped_inside_inference_mode_generates_outside_it(prompts, settings):
    settings = dict(settings)
    kwargs = {"num_beams": settings.pop("num_beams")} if "num_beams" in settings else {}
    model = tiny_model("llama")
    expected = generate(model, *prompts, **fixed_length(NEW_TOKENS), **kwargs)
    with torch.inference_mode():
        hf_paged.wrap(model, num_pages=64, page_size=4, **settings)
    assert_serves_outside_and_inside(model, prompts, expected, **kwargs)


def test_the_first_call_of_a_copy_inside_inference_mode_makes_a_normal_pool(prompts):
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    expected = stock_tokens(model, prompts)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert "pool" not in vars(clone.hf_paged_runtime)  # made by its first call, inside the block
        with torch.inference_mode():
            assert torch.equal(generate(clone, *prompts, **fixed_length(NEW_TOKENS)), expected)
        assert_serves_outside_and_inside(clone, prompts, expected)


def test_the_pool_remade_after_a_dtype_change_inside_inference_mode_is_normal():
    # Unpadded: stock's fp64 Gemma-2 gives NaN logits on a left-padded row (sdpa and eager alike).
    prompts = padded_prompts(batch=2, pads=(0, 0))
    model = hf_paged.wrap(tiny_model("gemma2"), num_pages=64, page_size=4)  # two groups of layers
    generate(model, *prompts, **fixed_length(NEW_TOKENS))
    model.to(torch.float64)
    expected = stock_tokens(model, prompts)
    with torch.inference_mode():
        assert torch.equal(generate(model, *prompts, **fixed_length(NEW_TOKENS)), expected)
    assert model.hf_paged_runtime.pool.specs[0].dtype == torch.float64
    assert_serves_outside_and_inside(model, prompts, expected)


def test_compiled_decode_buffers_made_inside_inference_mode_serve_calls_outside(prompts):
    from hf_paged.integration.compile import compile_decode

    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4, compile=True)
    expected = stock_tokens(model, prompts)
    compiled = compile_decode(model, backend="eager")
    with torch.inference_mode():  # the first compiled step makes the decode buffers
        assert torch.equal(generate(model, *prompts, **fixed_length(NEW_TOKENS)), expected)
    (static,) = compiled.caches.values()
    assert not any(buffer.is_inference() for buffer in static.buffers.tensors())
    assert torch.equal(generate(model, *prompts, **fixed_length(NEW_TOKENS)), expected)
    assert compiled.num_compiled_steps == 2 * (NEW_TOKENS - 1)


def test_flashinfer_wrappers_and_workspace_are_made_outside_inference_mode(monkeypatch, prompts):
    """What the FlashInfer executor keeps across calls (its workspace, its wrappers and what they
    allocate and refill when planned) is made and planned outside inference mode (the stand-in
    records the mode each call ran in)."""
    pytest.importorskip("flashinfer")
    from stand_in import Comparer, fake_flashinfer

    flashinfer = fake_flashinfer()
    modes = []
    for cls in (flashinfer.BatchDecodeWithPagedKVCacheWrapper, flashinfer.BatchPrefillWithPagedKVCacheWrapper):
        for method in ("__init__", "plan"):
            def recording(self, *args, _method=getattr(cls, method), **kwargs):
                modes.append(torch.is_inference_mode_enabled())
                return _method(self, *args, **kwargs)
            monkeypatch.setattr(cls, method, recording)
    monkeypatch.setitem(sys.modules, "flashinfer", flashinfer)
    model = tiny_model("llama")
    expected = generate(model, *prompts, **fixed_length(NEW_TOKENS))
    hf_paged.wrap(model, num_pages=64, page_size=4, backend="torch")
    comparer = model.hf_paged_runtime.executor = Comparer()
    with torch.inference_mode():
        assert torch.equal(generate(model, *prompts, **fixed_length(NEW_TOKENS)), expected)
    assert len(modes) >= 4 and not any(modes)
    assert not comparer.flashinfer._devices[torch.device("cpu")].workspace.is_inference()
    assert torch.equal(generate(model, *prompts, **fixed_length(NEW_TOKENS)), expected)


def decode_loop(model, cache, input_ids, steps: int = 4) -> torch.Tensor:
    """Your own greedy loop: the prompt, then `steps` tokens one at a time; logits `[batch, len + steps, vocab]`."""
    out = model(input_ids, past_key_values=cache)
    logits = [out.logits]
    for _ in range(steps):
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", ["llama", "gemma2", "falcon"])  # routed, two groups (in-flight prompt), patched
def test_your_own_decode_loop_runs_in_grad_mode(family):
    """As with stock's DynamicCache, no torch.no_grad() is needed: the same logits as under no_grad
    (stock's within rounding), and the pages go back."""
    model = tiny_model(family)
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    stock = decode_loop(model, DynamicCache(config=model.config), input_ids)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    with PagedCache(model) as cache, torch.no_grad():
        without_grad = decode_loop(model, cache, input_ids)
    with PagedCache(model) as cache:
        logits = decode_loop(model, cache, input_ids)
    assert logits.requires_grad and torch.equal(logits.detach(), without_grad)
    torch.testing.assert_close(logits.detach(), stock.detach(), rtol=1e-5, atol=1e-5)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_a_backward_through_the_pages_raises_saying_what_to_do():
    """The pages hold no graph: rather than gradients without every key's and value's share, a
    backward raises; the forward without a PagedCache (stock attention) gives stock's gradients."""
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    input_ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with PagedCache(model) as cache:
        logits = decode_loop(model, cache, input_ids, steps=1)
    with pytest.raises(RuntimeError, match="gradients cannot flow through attention over a PagedCache"):
        logits.sum().backward()
    assert "torch.no_grad()" in GRADIENT_ERROR and "without a PagedCache" in GRADIENT_ERROR
    model.zero_grad()
    # Only the key projections train (a LoRA on k_proj, say): the queries need no grad, the keys do.
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("k_proj" in name)
    with PagedCache(model) as cache:
        logits = decode_loop(model, cache, input_ids, steps=1)
    with pytest.raises(RuntimeError, match="gradients cannot flow"):
        logits.sum().backward()
    model(input_ids).logits.sum().backward()  # no cache: stock attention, stock's gradients
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
