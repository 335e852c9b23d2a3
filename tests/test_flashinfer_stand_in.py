"""The FlashInfer executor on CPU: its arguments, bound against the installed FlashInfer.

No FlashInfer kernel runs without a GPU. What can be checked here is everything the executor
hands to FlashInfer: the plan()/run()/constructor arguments are bound against the real
signatures (an API change fails here), the index tensors are int32 and equal to the metadata the
torch executor consumes, and a stand-in for FlashInfer that computes attention from nothing but
those arguments, with FlashInfer's documented semantics, reproduces the torch executor on every
forward of real generate() calls (padded prompts, beams sharing pages, windows, soft-caps).
"""

import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.attention import TorchExecutor
from hf_paged.attention.flashinfer import args as fa
from hf_paged.attention.flashinfer.executor import FlashInferExecutor

from tiny import COMMON, SMALL, padded_prompts, tiny_model

# Collected only where FlashInfer imports (its real signatures are what these tests bind against).
flashinfer = pytest.importorskip("flashinfer")

from stand_in import DECODE, PREFILL, Comparer, bind, fake_flashinfer  # noqa: E402


class Recorder(TorchExecutor):
    """The torch executor, recording every (metadata, params) it plans for."""

    def __init__(self):
        self.calls = []

    def plan(self, meta, params, pool):
        self.calls.append((meta, params, pool))
        return super().plan(meta, params, pool)

    def advance_plan(self, plan, meta):
        return None  # every forward is planned, so every forward's metadata is recorded


def recorded_forwards(family: str, page_size: int, pads: tuple[int, ...], **generate_kwargs):
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=len(pads), length=11, pads=pads)
    hf_paged.wrap(model, num_pages=256, page_size=page_size, backend="torch")
    recorder = model.hf_paged_runtime.executor = Recorder()
    model.generate(input_ids, attention_mask=mask, pad_token_id=0, max_new_tokens=6, min_new_tokens=6,
                   **generate_kwargs)
    return recorder.calls


@pytest.fixture(scope="module")
def beam_forwards():
    # The third prompt is one real token: prefilled once without its last token, its row has no
    # token and no page (kv_last_page_len 0) in that forward.
    return recorded_forwards("llama", page_size=4, pads=(0, 5, 10), num_beams=3, num_return_sequences=2)


def test_plan_arguments_bind_and_carry_the_torch_executors_metadata(beam_forwards):
    kinds = set()
    for meta, params, pool in beam_forwards:
        host = fa.host_indices(meta)
        for name in ("qo_indptr", "kv_indptr", "kv_last_page_len"):
            host_tensor, device_tensor = getattr(host, name), getattr(meta, name)
            assert host_tensor.dtype == torch.int32 and device_tensor.dtype == torch.int32, name
            assert host_tensor.device.type == "cpu"
            assert torch.equal(host_tensor, device_tensor.cpu()), name
        assert meta.kv_indices.dtype == torch.int32
        # FlashInfer's host planner sees the KV lengths the torch executor attends over.
        seq_lens = flashinfer.get_seq_lens(host.kv_indptr, host.kv_last_page_len, meta.page_size)
        assert seq_lens.tolist() == meta.kv_lens

        dtype = torch.bfloat16
        kind, cls = ("decode", DECODE) if meta.is_decode else ("prefill", PREFILL)
        kinds.add(kind)
        build = fa.decode_plan_args if meta.is_decode else fa.prefill_plan_args
        args, kwargs = build(meta, params, dtype, host)
        bound = bind(cls, "plan", args, kwargs).arguments
        bind(cls, "workspace_size", args, kwargs)
        indptr = bound["indptr"] if meta.is_decode else bound["paged_kv_indptr"]
        indices = bound["indices"] if meta.is_decode else bound["paged_kv_indices"]
        last = bound["last_page_len"] if meta.is_decode else bound["paged_kv_last_page_len"]
        assert indptr is host.kv_indptr and last is host.kv_last_page_len and indices is meta.kv_indices
        assert bound["num_qo_heads"] == params.num_qo_heads and bound["num_kv_heads"] == params.num_kv_heads
        assert bound["head_dim" if meta.is_decode else "head_dim_qk"] == params.head_dim
        assert bound["page_size"] == meta.page_size
        assert bound["q_data_type"] == dtype and bound["kv_data_type"] == dtype
        assert bound["sm_scale"] == params.sm_scale and bound["window_left"] == params.window_left
        assert bound["logits_soft_cap"] == params.logits_soft_cap and bound["pos_encoding_mode"] == "NONE"
        if not meta.is_decode:
            assert bound["qo_indptr"] is host.qo_indptr and bound["causal"] is True

        wrapper_args, wrapper_kwargs = fa.wrapper_args(kind, torch.zeros(16, dtype=torch.uint8))
        bound = bind(cls, "__init__", wrapper_args, wrapper_kwargs).arguments
        assert bound["kv_layout"] == "NHD" and bound["backend"] == "fa2"
        assert bound.get("use_tensor_cores", False) is (kind == "decode")

        q = torch.randn(sum(meta.qo_lens), params.num_qo_heads, params.head_dim)
        run_args, run_kwargs = fa.run_args(q, pool.pools[0], dtype)
        bound = bind(cls, "run", run_args, run_kwargs).arguments
        assert bound["q"].dtype == dtype and bound["q"].shape == q.shape
        k_cache, v_cache = bound["paged_kv_cache"]
        # The key plane itself, not a copy (compared by storage and view: the pool is torch.empty,
        # and unwritten slots may hold NaN, which torch.equal never calls equal).
        assert k_cache.shape == pool.pools[0][0].shape and k_cache.stride() == pool.pools[0][0].stride()
        assert k_cache.data_ptr() == pool.pools[0].data_ptr()
        assert v_cache.shape == k_cache.shape and v_cache.data_ptr() == pool.pools[0][1].data_ptr()
    assert kinds == {"decode", "prefill"}
    assert any(0 in meta.kv_lens for meta, _, _ in beam_forwards)  # the empty-row case is covered




@pytest.mark.parametrize(
    "family, page_size, pads, kwargs",
    [
        ("llama", 2, (0, 3), dict(num_beams=4, cascade=True)),  # beams attend the prompt once (cascade)
        ("llama", 1, (0, 10), dict(num_beams=3, num_return_sequences=2)),  # an empty row at prefill
        ("llama", 4, (0, 5), dict(do_sample=True, num_return_sequences=3)),
        ("gemma2", 3, (0, 5), dict(num_beams=2)),  # sliding window 5 on alternate layers, soft-capped scores
    ],
)
def test_executor_matches_torch_executor_through_flashinfer_api(monkeypatch, family, page_size, pads, kwargs):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=2, length=11, pads=pads)
    kwargs = dict(kwargs)
    cascade = kwargs.pop("cascade", False)
    hf_paged.wrap(model, num_pages=256, page_size=page_size, backend="torch", cascade=cascade)
    comparer = model.hf_paged_runtime.executor = Comparer()
    torch.manual_seed(0)
    model.generate(input_ids, attention_mask=mask, pad_token_id=0, max_new_tokens=6, min_new_tokens=6, **kwargs)
    assert ("FlashInferCascadePlan" in comparer.plan_types) == cascade
    wrappers = comparer.flashinfer._devices[torch.device("cpu")].wrappers
    assert {kind for kind, _, _ in wrappers} == {"decode", "prefill"} | ({"prefix"} if cascade else set())
    settings = {params for _, params, _ in wrappers}
    assert len(settings) == (2 if family == "gemma2" else 1)  # one wrapper per distinct layer setting
    if family == "gemma2":
        assert {p.window_left for p in settings} == {-1, 4} and all(p.logits_soft_cap == 5.0 for p in settings)
    # Every layer of every forward, but the sliding layer of the (beam) prompt's forward: it attends
    # from the forward's own K/V, not through the executor (inflight.py).
    assert comparer.num_compared >= 2 * 7 - (1 if family == "gemma2" else 0)


def test_two_groups_with_the_same_layer_setting_get_their_own_wrappers(monkeypatch):
    """Gemma 2's sliding layers attend without their window here (as Moshi's do): in a prompt forward
    both groups' layers then have one LayerParams but their own pages (of other sizes). A wrapper
    keyed by the setting alone would run one group's plan on the other's pages."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    torch.manual_seed(0)
    config = transformers.Gemma2Config(  # sliding, full, sliding, full: layer 2 runs after group 0 was planned
        **{**SMALL, "num_hidden_layers": 4}, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0, **COMMON
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    for layer in model.model.layers[::2]:
        layer.self_attn.sliding_window = None
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 5))
    # Sliding pages of 1 (by default they would fill the full layers' pages of 4: layout.py).
    hf_paged.wrap(model, num_pages=256, page_size=4, window_page_size=1, backend="torch")
    comparer = model.hf_paged_runtime.executor = Comparer()
    model.generate(input_ids, attention_mask=mask, pad_token_id=0, max_new_tokens=6, num_beams=2)
    runtime = model.hf_paged_runtime
    assert [(g.window, g.page_size, g.cache_window) for g in runtime.groups] == [(None, 4, False), (5, 1, True)]
    wrappers = comparer.flashinfer._devices[torch.device("cpu")].wrappers
    prefill = {(params, group) for kind, params, group in wrappers if kind == "prefill"}
    assert {group for _, group in prefill} == {0, 1} and len({params for params, _ in prefill}) == 1
    assert comparer.num_compared >= 4 * 6
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


@pytest.mark.slow
def test_compiled_decode_steps_run_graph_wrappers_planned_outside_the_graph(monkeypatch):
    """compile=True: each decode step plans CUDA-graph decode wrappers on the fixed buffers (eagerly)
    and the compiled graph runs them through torch.ops.hf_paged.paged_attention(backend="flashinfer")."""
    from hf_paged.integration.compile import compile_decode

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, length=11, pads=(0, 5))
    modes = {"greedy": {}, "beam": dict(num_beams=3)}
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=8, min_new_tokens=8)
    expected = {mode: model.generate(input_ids, **kwargs, **extra) for mode, extra in modes.items()}
    hf_paged.wrap(model, num_pages=128, page_size=4, compile=True, backend="torch")
    executor = model.hf_paged_runtime.executor = FlashInferExecutor()
    compiled = compile_decode(model, backend="eager")
    assert compiled.backend == "flashinfer"
    for mode, extra in modes.items():
        assert torch.equal(model.generate(input_ids, **kwargs, **extra), expected[mode]), mode
    # Greedy: 7 steps after the prompt's forward. Beams: the prompt minus its last token is prefilled
    # once, then every beam row feeds that token (one token per row: a decode step) and 7 more.
    assert compiled.num_compiled_steps == 7 + 8
    wrappers = executor._devices[torch.device("cpu")].wrappers
    graph = {key: record for key, record in wrappers.items() if key[0] == "graph"}
    assert len(graph) == 2  # one per row count (2, then 6 beams); one layer setting
    for record in graph.values():
        assert record.wrapper.init["use_cuda_graph"] is True and record.wrapper.init["use_tensor_cores"] is True
        assert record.wrapper.runs == 2 * record.wrapper.plans  # 2 layers per planned step
    assert sum(record.wrapper.plans for record in graph.values()) == compiled.num_compiled_steps
