"""The wrapped model's generate() returns exactly the tokens of the unwrapped model (fp32, CPU)."""

import pytest
import torch

import hf_paged
from hf_paged.attention import TorchExecutor

import tiny
from tiny import CONFIGS, MODES, padded_prompts, tiny_model, with_eos_mid_sequence



def generate(model, input_ids, mask, seed=5, max_new_tokens=10, **kwargs):
    return tiny.generate(model, input_ids, mask, seed=seed, max_new_tokens=max_new_tokens, **kwargs)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_every_mode_matches_stock(family):
    model = tiny_model(family)
    input_ids, mask = padded_prompts()
    kwargs = {mode: dict(min_new_tokens=10, **kw) for mode, kw in MODES.items()}
    expected = {mode: generate(model, input_ids, mask, **kw) for mode, kw in kwargs.items()}
    hf_paged.wrap(model, num_pages=128, page_size=4)
    for mode, kw in kwargs.items():
        assert torch.equal(generate(model, input_ids, mask, **kw), expected[mode]), f"{family} {mode}"
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


BEAM_CASES = {
    "beams2": dict(num_beams=2),
    "beams16": dict(num_beams=16, num_return_sequences=16),
    "length_penalty": dict(num_beams=4, length_penalty=0.5, num_return_sequences=3),
    "early_true": dict(num_beams=4, early_stopping=True),
    "early_false": dict(num_beams=4, early_stopping=False),
    "early_never": dict(num_beams=4, early_stopping="never"),
    "no_repeat_ngram": dict(num_beams=4, no_repeat_ngram_size=2),
}


# Llama every case; a family with a window on every layer (Mistral: 5, the prompts are 13 long, so
# rows end past it) and a patched family (Bloom) the beam variants.
BEAM_FAMILY_CASES = [("llama", case) for case in sorted(BEAM_CASES)] + [
    (family, case) for family in ("mistral", "bloom") for case in sorted(BEAM_CASES) if case != "beams16"
]


@pytest.mark.parametrize("family, case", BEAM_FAMILY_CASES)
def test_beam_search_variants_with_eos_mid_sequence(family, case):
    """EOS is a token greedy decoding emits mid-sequence, so beams finish early."""
    model, input_ids, mask = with_eos_mid_sequence(family, batch=3, pads=(0, 4, 7))
    kwargs = dict(BEAM_CASES[case], max_new_tokens=12)
    expected = generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=512, page_size=4)
    try:
        got = generate(model, input_ids, mask, **kwargs)
    finally:
        hf_paged.unwrap(model)
    assert torch.equal(got, expected)
    assert (expected == model.generation_config.eos_token_id).any(), "the case must exercise an EOS"


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_scores_and_sequences_match_with_return_dict(page_size):
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 5))
    kwargs = dict(num_beams=3, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    expected = generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=256, page_size=page_size)
    got = generate(model, input_ids, mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores)
    for ours, theirs in zip(got.scores, expected.scores):
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


def test_sampling_scores_match():
    model = tiny_model("qwen2")
    input_ids, mask = padded_prompts(batch=2, pads=(3, 0))
    kwargs = dict(do_sample=True, num_return_sequences=4, output_scores=True, return_dict_in_generate=True)
    expected = generate(model, input_ids, mask, **kwargs)
    hf_paged.wrap(model, num_pages=128, page_size=8)
    got = generate(model, input_ids, mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_uneven_prompt_lengths_in_one_batch():
    model = tiny_model("mistral")
    input_ids, mask = padded_prompts(batch=4, length=20, pads=(0, 3, 11, 18))
    expected = generate(model, input_ids, mask, max_new_tokens=15)
    hf_paged.wrap(model, num_pages=128, page_size=4)
    assert torch.equal(generate(model, input_ids, mask, max_new_tokens=15), expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prompt_lookup_decoding(family):
    model = tiny_model(family)
    # A prompt that repeats itself, so lookup proposes candidates and some are accepted.
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]])
    kwargs = dict(prompt_lookup_num_tokens=3, max_new_tokens=12, min_new_tokens=12)
    expected = model.generate(input_ids, pad_token_id=0, **kwargs)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    assert torch.equal(model.generate(input_ids, pad_token_id=0, **kwargs), expected)


def test_assisted_decoding_with_an_unwrapped_assistant():
    model = tiny_model("llama", seed=0)
    assistant = tiny_model("llama", seed=1)
    input_ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(assistant_model=assistant, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    assert torch.equal(model.generate(input_ids, **kwargs), expected)


def test_prefill_runs_once_per_input_not_once_per_beam():
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 2))
    hf_paged.wrap(model, num_pages=128, page_size=4)
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        generate(model, input_ids, mask, num_beams=4, max_new_tokens=3)
    finally:
        handle.remove()
    assert seen[0] == (2, 10), "the prompt minus its last token, once per input"
    assert seen[1:] == [(8, 1)] * 3, "then one token per beam per step"


# -- rows that share nothing read their pages in place ---------------------------------------------


class PlanRecorder(TorchExecutor):
    """The torch executor, counting the plans that read every row in place and those that gather.

    Plans of sliding-window groups are counted apart (`windowed`): such a group releases the first
    pages of every row, which ends the rows' consecutive runs.
    """

    def __init__(self, groups):
        self.groups = groups
        self.in_place = self.gathered = self.windowed = 0

    def plan(self, meta, params, pool):
        return self._count(super().plan(meta, params, pool), meta)

    def advance_plan(self, plan, meta):
        """Decode steps on the pages of the forward before carry its plan over: counted the same."""
        advanced = super().advance_plan(plan, meta)
        return advanced if advanced is None else self._count(advanced, meta)

    def _count(self, plan, meta):
        if plan.params.window_left >= 0 or self.groups[meta.group].window is not None:
            self.windowed += 1
        elif plan.row_run is not None:
            self.in_place += 1
        else:
            self.gathered += 1
        return plan


def record_plans(model) -> PlanRecorder:
    """Give the wrapped `model` an executor that records its plans (through the Executor interface)."""
    recorder = model.hf_paged_runtime.executor = PlanRecorder(model.hf_paged_runtime.groups)
    return recorder


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_unpadded_greedy_and_sampling_read_in_place_and_match_stock(family):
    model = tiny_model(family)
    input_ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    modes = {"greedy": dict(), "sample": dict(do_sample=True, top_k=20)}
    expected = {mode: generate(model, input_ids, None, min_new_tokens=10, **kw) for mode, kw in modes.items()}
    hf_paged.wrap(model, num_pages=64, page_size=4)
    plans = record_plans(model)
    for mode, kw in modes.items():
        assert torch.equal(generate(model, input_ids, None, min_new_tokens=10, **kw), expected[mode]), mode
    assert plans.gathered == 0, "every forward (prompt + 9 steps) of the full-attention layers reads in place"
    if any(group.window is None for group in model.hf_paged_runtime.groups):
        assert plans.in_place >= 2 * 10  # at least one plan per forward (one per distinct layer setting)
    else:  # every decode step; the prompt's sliding layers attend from its own K/V (inflight.py)
        assert plans.windowed >= 2 * 9
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_a_fragmented_pool_falls_back_to_the_gather_and_matches_stock():
    model = tiny_model("llama")
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    expected = generate(model, input_ids, None, min_new_tokens=10)
    hf_paged.wrap(model, num_pages=40, page_size=4)
    blocks = model.hf_paged_runtime.pool.blocks
    held = [page for page in range(3, 40, 5) if blocks.take(page)]  # no run of 2 x 5 free pages is left
    assert blocks.find_free_run(10) is None
    plans = record_plans(model)
    assert torch.equal(generate(model, input_ids, None, min_new_tokens=10), expected)
    assert plans.in_place == 0 and plans.gathered == 10
    blocks.free(held)
    assert torch.equal(generate(model, input_ids, None, min_new_tokens=10), expected)
    assert plans.in_place == 10 and blocks.num_used_pages == 0


def test_rows_outgrowing_their_reservation_match_stock(monkeypatch):
    model = tiny_model("llama")
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    expected = generate(model, input_ids, None, max_new_tokens=30, min_new_tokens=30)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    import hf_paged.integration.generate as paged_generate

    monkeypatch.setattr(paged_generate, "generate_max_tokens", lambda *args: 13)  # a hint that is too small
    plans = record_plans(model)
    assert torch.equal(generate(model, input_ids, None, max_new_tokens=30, min_new_tokens=30), expected)
    # 13 tokens = 4 pages of 4 per row: in place up to 16 tokens (prompt and 7 steps), gathered after.
    assert (plans.in_place, plans.gathered) == (8, 22)


def test_reservation_hint_is_an_upper_bound_of_prompt_plus_new_tokens():
    from transformers import GenerationConfig

    from hf_paged.integration.compile import generate_max_tokens

    model = tiny_model("llama")
    ids = torch.ones(2, 7, dtype=torch.long)
    assert generate_max_tokens(model, ids, None, {"max_new_tokens": 5}) == 12
    assert generate_max_tokens(model, None, None, {"input_ids": ids, "max_new_tokens": 5}) == 12
    assert generate_max_tokens(model, ids, GenerationConfig(max_new_tokens=9), {}) == 16
    assert generate_max_tokens(model, ids, None, {"max_length": 30}) == 37  # max_length counts the prompt: over
    assert generate_max_tokens(model, ids, GenerationConfig(max_length=25), {}) == 32
    embeds = torch.zeros(2, 7, 16)
    assert generate_max_tokens(model, None, None, {"inputs_embeds": embeds, "max_new_tokens": 5}) == 12
