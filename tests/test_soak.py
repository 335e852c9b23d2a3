"""A long run of mixed generate() calls, failing ones included: no page and no memory may leak."""

import random

import pytest
import torch
from transformers import StoppingCriteriaList

import hf_paged
from hf_paged import OutOfPagesError

from tiny import Interrupt, padded_prompts, tiny_model

NUM_CALLS = 1000
NUM_PAGES = 48
PAGE_SIZE = 4


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def _one_call(model, stock, assistant, rng: random.Random, call: int) -> str:
    """Run one random call; returns its kind. Calls that must fail assert that they did; the others
    return the unwrapped `stock` model's tokens (both seeded alike)."""
    batch, length = rng.randint(1, 3), rng.randint(3, 12)
    pads = tuple(rng.randint(0, length - 2) for _ in range(batch))
    input_ids, mask = padded_prompts(batch=batch, length=length, pads=pads, seed=call)
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=rng.randint(1, 6))
    kind = rng.choice(["greedy", "sample", "beams", "beam_sample", "assisted", "too_big", "interrupt"])
    if kind == "sample":
        kwargs.update(do_sample=True, num_return_sequences=rng.randint(1, 3))
    elif kind == "beams":
        beams = rng.randint(2, 4)
        kwargs.update(num_beams=beams, num_return_sequences=rng.randint(1, beams))
    elif kind == "beam_sample":
        kwargs.update(do_sample=True, num_beams=rng.randint(2, 3))
    elif kind == "assisted":  # batch size 1 only (transformers)
        input_ids, kwargs["attention_mask"] = input_ids[:1], mask[:1]
        kwargs["assistant_model"] = assistant
    elif kind == "too_big" and call % 2:  # a prompt longer than the pool: fails before the first forward
        input_ids = torch.randint(3, 100, (1, NUM_PAGES * PAGE_SIZE + 1))
        kwargs["attention_mask"] = torch.ones_like(input_ids)
    elif kind == "too_big":  # rows that share nothing outgrow the pool: fails a few steps in
        length = NUM_PAGES * PAGE_SIZE // 3 - 2
        input_ids, mask = padded_prompts(batch=3, length=length, pads=(0, 0, 0), seed=call)
        kwargs.update(attention_mask=mask, max_new_tokens=4 * PAGE_SIZE, min_new_tokens=4 * PAGE_SIZE)
    elif kind == "interrupt":
        kwargs.update(num_beams=2, max_new_tokens=6, stopping_criteria=StoppingCriteriaList([Interrupt(2, InterruptedError)]))
    expected_error = {"too_big": OutOfPagesError, "interrupt": InterruptedError}.get(kind)
    if expected_error is None:
        torch.manual_seed(call)
        out = model.generate(input_ids, **kwargs)
        torch.manual_seed(call)
        assert torch.equal(out, stock.generate(input_ids, **kwargs)), (call, kind)
    else:
        with pytest.raises(expected_error):
            model.generate(input_ids, **kwargs)
    return kind


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one intra-op thread (and the soak then takes seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_thousand_mixed_calls_leak_no_page_and_no_memory(one_thread):
    torch.manual_seed(0)
    model = hf_paged.wrap(tiny_model("llama"), num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    assistant, stock = tiny_model("llama", seed=1), tiny_model("llama")
    rng = random.Random(0)
    kinds: dict[str, int] = {}
    rss_at_100 = None
    for call in range(NUM_CALLS):
        kind = _one_call(model, stock, assistant, rng, call)
        kinds[kind] = kinds.get(kind, 0) + 1
        assert hf_paged.memory_stats(model)["pages_in_use"] == 0, (call, kind)
        if call == 99:
            rss_at_100 = _rss_bytes()
    growth = _rss_bytes() - rss_at_100
    assert growth < 4 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB from call 100 to call {NUM_CALLS}"
    assert min(kinds.values()) > NUM_CALLS // 10, kinds  # every kind ran many times
    blocks = model.hf_paged_runtime.pool.blocks
    assert sorted(blocks.free_page_ids) == list(range(NUM_PAGES)) and not any(blocks.ref_counts)
