"""Random generate() calls (hypothesis): the wrapped model returns the unwrapped model's tokens on every one."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_paged

from tiny import MODES, generate, padded_prompts, tiny_model



@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: several times faster on one intra-op thread
    yield tiny_model("llama"), tiny_model("llama")
    torch.set_num_threads(threads)


@st.composite
def calls(draw):
    mode = draw(st.sampled_from(list(MODES)))
    beams = draw(st.integers(2, 8)) if mode in ("beam", "beam_sample") else 1
    most_returned = beams if beams > 1 else (4 if mode == "sample" else 1)
    batch, length = draw(st.integers(1, 3)), draw(st.integers(2, 10))
    return dict(
        mode=mode,
        num_beams=beams,
        num_return_sequences=draw(st.integers(1, most_returned)),
        batch=batch,
        length=length,
        pads=tuple(draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch))),
        page_size=draw(st.integers(1, 32)),
        max_new_tokens=draw(st.integers(1, 8)),
        # None: no EOS; else the token stock generates at this step of row 0 becomes the EOS.
        eos_step=draw(st.none() | st.integers(0, 7)),
        seed=draw(st.integers(0, 2**16)),
    )


def _generate(model, call: dict, input_ids, mask, eos_token_id):
    return generate(
        model, input_ids, mask, seed=call["seed"], eos_token_id=eos_token_id,
        do_sample=call["mode"] in ("sample", "beam_sample"), num_beams=call["num_beams"],
        num_return_sequences=call["num_return_sequences"], max_new_tokens=call["max_new_tokens"],
    )


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_random_calls_return_stock_tokens(models, call):
    stock, model = models
    input_ids, mask = padded_prompts(call["batch"], call["length"], call["pads"], seed=call["seed"])
    eos = None  # (tiny models never emit their configured EOS by chance; pick one they do emit)
    if call["eos_step"] is not None:
        free_run = _generate(stock, call, input_ids, mask, eos_token_id=None)
        step = min(call["eos_step"], free_run.shape[1] - call["length"] - 1)
        eos = int(free_run[0, call["length"] + step])
    expected = _generate(stock, call, input_ids, mask, eos)
    num_pages = 3 * 8 * (10 + 8 + call["page_size"]) // call["page_size"] + 8  # every row unshared
    hf_paged.wrap(model, page_size=call["page_size"], num_pages=num_pages)
    got = _generate(model, call, input_ids, mask, eos)
    assert torch.equal(got, expected)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
