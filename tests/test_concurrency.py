"""Many generate() calls on one wrapped model at once: each owns its cache on the shared pool."""

import threading

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_paged
from hf_paged import OutOfPagesError

from threads import Worker, run_threads
from tiny import padded_prompts, tiny_model

# Deterministic modes only: sampling draws from torch's global generator, which threads share, so
# "sampling" here is top_k=1 (the sampling code path, with a single candidate).
MODES = {
    "greedy": dict(),
    "beams": dict(num_beams=4),
    "beams_return": dict(num_beams=3, num_return_sequences=2),
    "sample_top1": dict(do_sample=True, top_k=1, num_return_sequences=3),
    "prompt_lookup": dict(prompt_lookup_num_tokens=2),
    "no_cache": dict(use_cache=False),
}


class Pause(StoppingCriteria):
    """Blocks generate() at its `at`-th step until `resume` is set; stops nothing."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0
        self.reached, self.resume = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.resume.wait(60), "the test never resumed this call"
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _inputs(call: int):
    batch = 1 + call % 3
    return padded_prompts(batch=batch, length=6 + 2 * (call % 4), pads=(0, 3, 1)[:batch], seed=call)


def _generate(model, call: int, mode: str, **extra):
    input_ids, mask = _inputs(call)
    if mode == "prompt_lookup":  # batch size 1 only (transformers)
        input_ids, mask = input_ids[:1], mask[:1]
    return model.generate(
        input_ids, attention_mask=mask, max_new_tokens=4 + call % 3, pad_token_id=0, **MODES[mode], **extra
    )


def test_eight_threads_of_mixed_modes_return_the_sequential_tokens():
    calls = [(thread, round_) for thread in range(8) for round_ in range(3)]
    modes = list(MODES)
    stock = tiny_model("llama")
    expected = {(t, r): _generate(stock, 3 * t + r, modes[(t + r) % len(modes)]) for t, r in calls}
    model = hf_paged.wrap(tiny_model("llama"), num_pages=512, page_size=4)

    def thread_calls(thread):
        return [_generate(model, 3 * thread + r, modes[(thread + r) % len(modes)]) for r in range(3)]

    results = run_threads(thread_calls, 8)
    for thread, outputs in enumerate(results):
        for round_, out in enumerate(outputs):
            assert torch.equal(out, expected[thread, round_]), (thread, round_, modes[(thread + round_) % len(modes)])
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def _start_paused(model, call: int, mode: str, at: int = 2):
    """Run a call on a thread until its `at`-th step; returns (pause, worker)."""
    pause = Pause(at)
    worker = Worker(lambda: _generate(model, call, mode, stopping_criteria=StoppingCriteriaList([pause]))).start()
    assert pause.reached.wait(60)
    return pause, worker


def test_each_call_reports_its_own_peak_pages():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=256, page_size=2)
    alone = {}
    for call, mode in ((5, "beams"), (1, "greedy")):
        _generate(model, call, mode)
        alone[call] = hf_paged.memory_stats(model)["peak_pages_in_use"]
    assert alone[5] > alone[1] > 0
    pause, worker = _start_paused(model, 5, "beams")  # holds its pages while call 1 runs
    assert hf_paged.memory_stats(model)["pages_in_use"] > 0
    _generate(model, 1, "greedy")
    assert hf_paged.memory_stats(model)["peak_pages_in_use"] == alone[1]
    pause.resume.set()
    worker.result(60)
    assert hf_paged.memory_stats(model)["peak_pages_in_use"] == alone[5]
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_a_call_that_finds_the_pool_short_raises_and_leaves_the_others_intact():
    stock = tiny_model("llama")
    expected = _generate(stock, 5, "beams")
    model = hf_paged.wrap(tiny_model("llama"), num_pages=40, page_size=2)
    pause, worker = _start_paused(model, 5, "beams")
    held = hf_paged.memory_stats(model)["pages_in_use"]
    free = 40 - held
    input_ids = torch.randint(3, 100, (1, 2 * free + 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OutOfPagesError, match=f"{free} of 40 free"):
        model.generate(input_ids, max_new_tokens=2, pad_token_id=0)
    assert hf_paged.memory_stats(model)["pages_in_use"] == held  # the failed call gave back all it took
    pause.resume.set()
    assert torch.equal(worker.result(60), expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_concurrent_compiled_decode_calls_match_stock():
    """PagedConfig(compile=True): calls on several threads share the compiled steps, one at a time."""
    stock = tiny_model("llama")
    modes = ["greedy", "beams", "greedy", "beams"]
    expected = [_generate(stock, call, mode) for call, mode in enumerate(modes)]
    model = hf_paged.wrap(tiny_model("llama"), num_pages=256, page_size=4, compile=True)
    hf_paged.integration.compile.compile_decode(model, backend="aot_eager")
    results = run_threads(lambda call: _generate(model, call, modes[call]), len(modes))
    assert all(torch.equal(got, want) for got, want in zip(results, expected))
    compiled = model.hf_paged_runtime.compiled
    assert compiled.num_compiled_steps > 0 and compiled.num_installed == 0
    assert "forward" not in model.hf_paged_runtime.decoder.__dict__
