"""torch.compile-ready decode: the custom ops, fixed-shape decode metadata, compiled generate().

Dynamo checks run with cheap backends (a counting "eager" backend, "aot_eager"); one slow test
runs the default inductor path end to end.
"""

import functools

import pytest
import torch

import hf_paged
from hf_paged.attention import ops
from hf_paged.cache.static_decode import DecodeBuffers, StaticDecodeCache
from hf_paged.integration.compile import compile_decode, compiled_decode
from hf_paged.cache.runtime import CACHE_KWARG

from reference import dense_rows, paged_inputs
import tiny
from tiny import CountingBackend, fixed_length, padded_prompts, tiny_model

NEW_TOKENS = 40  # decode steps per generate(): more than the 32 the no-recompile check needs


# -- the ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("window_left, soft_cap", [(-1, 0.0), (3, 0.0), (-1, 5.0)])
def test_paged_attention_op_matches_dense_rows(page_size, window_left, soft_cap):
    kv_lens, qo_lens = [5, 1, 19, 8], [2, 1, 3, 1]  # ragged new tokens, awkward lengths
    inputs, dense = paged_inputs(page_size, kv_lens, qo_lens)
    expected = dense_rows(inputs[0], dense, qo_lens, 0.3, window_left, soft_cap)
    for max_kv in (max(kv_lens), 64):  # exact maxima, and a fixed capacity as the compiled decode uses
        out = torch.ops.hf_paged.paged_attention(*inputs, max(qo_lens), max_kv, 0.3, window_left, soft_cap, "torch")
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_op_decode_rows():
    """One new token per row: the path a compiled decode step takes (no query scatter)."""
    kv_lens, qo_lens = [7, 1, 12], [1, 1, 1]
    inputs, dense = paged_inputs(4, kv_lens, qo_lens)
    out = torch.ops.hf_paged.paged_attention(*inputs, 1, 32, 0.5, -1, 0.0, "torch")
    torch.testing.assert_close(out, dense_rows(inputs[0], dense, qo_lens, 0.5, -1, 0.0), atol=1e-5, rtol=1e-5)


def test_paged_attention_op_unknown_backend_says_what_to_do():
    inputs, _ = paged_inputs(4, [3], [1])
    with pytest.raises(ValueError, match="RUNNERS.register"):
        torch.ops.hf_paged.paged_attention(*inputs, 1, 4, 0.5, -1, 0.0, "nope")


@pytest.mark.parametrize("write", [torch.ops.hf_paged.write_kv, ops.write_kv_auto])
def test_write_kv_writes_keys_and_values_by_slot(write):
    page_size, pool = 4, torch.zeros(2, 6, 4, 2, 3)
    key, value = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    slots = torch.tensor([0, 7, 13])  # page 0 slot 0, page 1 slot 3, page 3 slot 1
    write(pool, key, value, slots)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(pool[0, slot // page_size, slot % page_size], key[i])
        assert torch.equal(pool[1, slot // page_size, slot % page_size], value[i])
    assert int((pool != 0).any(-1).any(-1).sum()) == 6  # nothing else written


def test_torchscript_function_calls_the_op():
    @torch.jit.script
    def scripted(q, pool, qo_indptr, kv_indptr, kv_indices, last_page_len, max_kv: int) -> torch.Tensor:
        return torch.ops.hf_paged.paged_attention(
            q, pool, qo_indptr, kv_indptr, kv_indices, last_page_len, 1, max_kv, 0.5, -1, 0.0, "torch"
        )

    assert "hf_paged::paged_attention" in str(scripted.graph)
    inputs, dense = paged_inputs(4, [6, 3], [1, 1])
    expected = dense_rows(inputs[0], dense, [1, 1], 0.5, -1, 0.0)
    torch.testing.assert_close(scripted(*inputs, 16), expected, atol=1e-5, rtol=1e-5)


def test_op_traces_in_a_fullgraph_compile_without_breaks():
    backend = CountingBackend()

    @torch.compile(backend=backend, fullgraph=True)
    def step(q, pool, qo_indptr, kv_indptr, kv_indices, last_page_len, key, slots):
        torch.ops.hf_paged.write_kv(pool, key, key, slots)
        return torch.ops.hf_paged.paged_attention(
            q, pool, qo_indptr, kv_indptr, kv_indices, last_page_len, 1, 16, 0.5, -1, 0.0, "torch"
        )

    inputs, _ = paged_inputs(4, [6, 3], [1, 1])
    key = torch.randn(2, 2, 8)
    slots = torch.tensor([int(inputs[4][0]) * 4 + 1, int(inputs[4][2]) * 4 + 2])  # tokens 5 of row 0, 2 of row 1
    step(*inputs, key, slots)
    assert backend.num_graphs == 1
    assert torch.equal(inputs[1][0, int(inputs[4][0]), 1, :, :], key[0])


# -- compiled generate() -----------------------------------------------------------------------


def generate(model, input_ids, mask, new_tokens=NEW_TOKENS, **kwargs):
    return tiny.generate(model, input_ids, mask, **fixed_length(new_tokens), **kwargs)


@pytest.fixture(scope="module")
def stock_tokens():
    """Tokens of the unwrapped model: greedy and beam search on a left-padded batch."""
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    expected = {
        "greedy": generate(model, input_ids, mask),
        "beam": generate(model, input_ids, mask, num_beams=3),
        "short_beam": generate(model, input_ids, mask, new_tokens=12, num_beams=3),
    }
    return input_ids, mask, expected


def test_compiled_decode_matches_stock_and_compiles_once(stock_tokens):
    """PagedConfig(compile=True): fullgraph decode, same tokens, one graph per row count for 40 steps."""
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4, compile=True)
    backend = CountingBackend()
    compiled = compile_decode(model, backend=backend)  # fullgraph=True, dynamic=False by default
    decoder = model.hf_paged_runtime.decoder
    dynamo_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    assert torch.equal(generate(model, input_ids, mask), expected["greedy"])
    assert compiled.num_compiled_steps == NEW_TOKENS - 1 and backend.num_graphs == 1
    assert "forward" not in decoder.__dict__  # the dispatcher is installed only inside generate()

    # Another prompt length in the same capacity bucket: no new graph.
    generate(model, input_ids[:, 2:], mask[:, 2:])
    assert compiled.num_compiled_steps == 2 * (NEW_TOKENS - 1) and backend.num_graphs == 1

    # Beam search: 6 rows instead of 2 is one new graph, then none across its 40 steps.
    assert torch.equal(generate(model, input_ids, mask, num_beams=3), expected["beam"])
    assert compiled.num_compiled_steps == 2 * (NEW_TOKENS - 1) + NEW_TOKENS and backend.num_graphs == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - dynamo_graphs == 2
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_aot_eager_beam_search_with_copy_on_write_matches_stock(stock_tokens):
    """aot_eager functionalizes the pool write (write_kv mutates its input); beams share and copy pages."""
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4, compile=True)
    compiled = compile_decode(model, backend="aot_eager")
    assert torch.equal(generate(model, input_ids, mask, new_tokens=12, num_beams=3), expected["short_beam"])
    assert compiled.num_compiled_steps == 12


def seq_lengths_seen(model, input_ids, mask, compile: bool) -> tuple[list[int], object]:
    """`get_seq_length()` of the cache each decoder forward attends through, read inside the forward
    (inside the compiled graph for compiled steps), and the CompiledDecode (None: eager only)."""
    decoder = model.hf_paged_runtime.decoder
    original, seen = decoder.forward, []

    @functools.wraps(original)
    def recording(*args, **kwargs):
        seen.append(torch.as_tensor(kwargs[CACHE_KWARG].get_seq_length()).clone())  # a graph output when compiled
        return original(*args, **kwargs)

    decoder.forward = recording  # what compile_decode compiles and the dispatcher runs eagerly
    compiled = compile_decode(model, backend="eager") if compile else None
    try:
        generate(model, input_ids, mask, new_tokens=6)
    finally:
        del decoder.forward
    return [int(length) for length in seen], compiled


def test_a_compiled_step_sees_the_seq_length_the_eager_cache_reports():
    """No model in 5.25 reads `get_seq_length()` when position_ids are passed, but a release that
    derives positions or masks from it would change tokens: inside each compiled decode step the
    StaticDecodeCache reports what the eager PagedCache reports at the same step."""
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    eager, _ = seq_lengths_seen(hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4), input_ids, mask, False)
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4, compile=True)
    lengths, compiled = seq_lengths_seen(model, input_ids, mask, True)
    assert compiled.num_compiled_steps == 5 and compiled.num_eager_steps == 1  # the prompt runs eagerly
    assert eager == [0] + list(range(input_ids.shape[1], input_ids.shape[1] + 5))  # the padded length
    assert lengths == eager


@pytest.mark.slow
def test_steps_past_capacity_run_eagerly_and_stay_exact(stock_tokens):
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4)
    compiled = compile_decode(model, backend=CountingBackend())
    with compiled_decode(model, max_tokens=input_ids.shape[1] + 10):  # room for 16 tokens of 4-token pages...
        out = generate(model, input_ids, mask)  # ...but generate() goes to 53
    assert torch.equal(out, expected["greedy"])
    assert compiled.pages_per_row is None and "forward" not in model.hf_paged_runtime.decoder.__dict__
    capacity = 8 * 4  # 24 tokens rounded up to a power of two of pages
    assert compiled.num_compiled_steps == capacity - input_ids.shape[1]
    assert compiled.num_eager_steps == 1 + NEW_TOKENS - 1 - compiled.num_compiled_steps


def test_compiled_decode_gemma2_soft_cap_and_sliding_window():
    """Per-layer window and logit soft-cap reach the op as scalars; still one graph."""
    model = tiny_model("gemma2")
    input_ids, mask = padded_prompts(batch=2, pads=(0, 4))
    expected = generate(model, input_ids, mask, new_tokens=12)
    hf_paged.wrap(model, num_pages=128, page_size=4, compile=True)
    backend = CountingBackend()
    compiled = compile_decode(model, backend=backend)
    assert torch.equal(generate(model, input_ids, mask, new_tokens=12), expected)
    assert compiled.num_compiled_steps == 11 and backend.num_graphs == 1


@pytest.mark.slow
def test_past_dynamo_recompile_limit_steps_run_eagerly(stock_tokens):
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4, compile=True)
    backend = CountingBackend()
    compiled = compile_decode(model, backend=backend)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert torch.equal(generate(model, input_ids, mask), expected["greedy"])
        with pytest.warns(UserWarning, match="recompile_limit"):
            beams = generate(model, input_ids, mask, num_beams=3)  # 6 rows would need a second graph
    assert torch.equal(beams, expected["beam"])
    assert backend.num_graphs == 1 and compiled.num_compiled_steps == NEW_TOKENS - 1


def test_other_executors_plan_outside_the_graph_and_run_inside_the_op(stock_tokens):
    """The contract for FlashInfer: `plan_decode(meta, cache)` before each step, a registered runner per layer."""
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4, compile=True)
    torch_executor, calls = model.hf_paged_runtime.executor, {"plan_decode": 0, "run": 0}

    class RecordingExecutor:
        name = "recording"
        cascade_by_default = reads_in_place = True
        op_runner = "recording"
        plan, run = torch_executor.plan, torch_executor.run  # eager steps

        def plan_decode(self, meta, cache):
            assert meta.is_decode and cache.buffers.rows == meta.num_rows
            assert torch.equal(cache.buffers.kv_last_page_len, meta.kv_last_page_len)  # already filled
            calls["plan_decode"] += 1

    def runner(*args):
        calls["run"] += 1
        return ops.run_torch(*args)

    ops.RUNNERS.register("recording", runner)
    try:
        model.hf_paged_runtime.executor = RecordingExecutor()
        compiled = compile_decode(model, backend=CountingBackend())
        assert torch.equal(generate(model, input_ids, mask), expected["greedy"])
    finally:
        ops.RUNNERS.unregister("recording")
    assert calls == {"plan_decode": NEW_TOKENS - 1, "run": 2 * (NEW_TOKENS - 1)}  # 2 layers
    assert compiled.num_compiled_steps == NEW_TOKENS - 1


def test_compile_false_compiles_nothing(stock_tokens):
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4)
    dynamo_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(generate(model, input_ids, mask), expected["greedy"])
    assert model.hf_paged_runtime.compiled is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == dynamo_graphs


def test_export_a_decode_step():
    """torch.export of the decoder forward on a StaticDecodeCache; the program runs a real step."""
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    runtime = model.hf_paged_runtime
    input_ids, _ = padded_prompts(batch=2, pads=(0, 0))
    cache = hf_paged.PagedCache(model)
    with torch.no_grad():
        model(input_ids, past_key_values=cache, use_cache=True)
    buffers = DecodeBuffers(2, 8, 4, runtime.pool.zero_page_id, torch.device("cpu"))
    static = StaticDecodeCache(runtime.pool.pools, buffers, "torch")

    class DecodeStep(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, position_ids):
            # .forward, not __call__: wrap's hooks would treat a non-PagedCache forward as stock.
            out = self.decoder.forward(  # the cache reaches attention as wrap's pre-hook would pass it
                input_ids=input_ids, position_ids=position_ids, past_key_values=static, use_cache=True,
                **{CACHE_KWARG: static},
            )
            return out.last_hidden_state

    next_ids, positions = torch.tensor([[5], [7]]), torch.full((2, 1), input_ids.shape[1])
    try:
        program = torch.export.export(DecodeStep(runtime.decoder), (next_ids, positions))
        targets = [str(node.target) for node in program.graph.nodes]
        assert targets.count("hf_paged.write_kv.default") == 2
        assert targets.count("hf_paged.paged_attention.default") == 2
        cache.begin_forward(2, 1, None, torch.device("cpu"))
        buffers.load(cache._state().meta, cache.get_seq_length())
        with torch.no_grad():
            exported = program.module()(next_ids, positions)
    finally:
        cache.end_forward()
    cache.crop(-1)
    with torch.no_grad():
        eager = runtime.decoder(next_ids, position_ids=positions, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(exported, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    cache.release()


@pytest.mark.slow
def test_default_inductor_compile_matches_stock(stock_tokens):
    """PagedConfig(compile=True) with its defaults (inductor on CPU), greedy."""
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4, compile=True)
    assert torch.equal(generate(model, input_ids, mask), expected["greedy"])
    assert model.hf_paged_runtime.compiled.num_compiled_steps == NEW_TOKENS - 1


def test_a_shape_past_the_recompile_limit_is_never_compiled_again(stock_tokens):
    """Each retry would print torch's recompile_limit warning once more, at every step of every call."""
    input_ids, mask, expected = stock_tokens
    model = hf_paged.wrap(tiny_model("llama"), num_pages=128, page_size=4, compile=True)
    compiled = compile_decode(model, backend=CountingBackend())
    calls, compiled_forward = [], compiled.compiled

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return compiled_forward(*args, **kwargs)

    compiled.compiled = counting
    with torch._dynamo.config.patch(recompile_limit=1):
        generate(model, input_ids, mask)
        with pytest.warns(UserWarning, match="recompile_limit"):
            generate(model, input_ids, mask, num_beams=3)
        assert torch.equal(generate(model, input_ids, mask, num_beams=3), expected["beam"])
    assert calls.count(6) == 1  # 6 rows: tried once, then eager for the rest of that call and the next
    assert compiled.num_compiled_steps == NEW_TOKENS - 1
