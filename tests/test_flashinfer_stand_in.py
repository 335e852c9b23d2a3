"""The FlashInfer executor on CPU: its arguments, bound against the installed FlashInfer.

No FlashInfer kernel runs without a GPU. What can be checked here is everything the executor
hands to FlashInfer: the plan()/run()/constructor arguments are bound against the real
signatures (an API change fails here), the index tensors are int32 and equal to the metadata the
torch executor consumes, and a stand-in for FlashInfer that computes attention from nothing but
those arguments, with FlashInfer's documented semantics, reproduces the torch executor on every
forward of real generate() calls (padded prompts, beams sharing pages, windows, soft-caps).
"""

import inspect
import math
import sys
import types

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

DECODE = flashinfer.BatchDecodeWithPagedKVCacheWrapper
PREFILL = flashinfer.BatchPrefillWithPagedKVCacheWrapper


def bind(cls, method: str, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a call of `cls.method` strictly: no argument may fall into *args or **kwargs.

    `BatchDecodeWithPagedKVCacheWrapper.plan` takes `**kwargs` and forwards them to
    `_plan_impl`, so keywords are bound against the implementation too.
    """
    function = getattr(cls, method)
    bound = inspect.signature(function).bind(None, *args, **kwargs)
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            assert not bound.arguments.get(name), f"{cls.__name__}.{method} got extra positional arguments"
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and bound.arguments.get(name):
            impl = getattr(cls, f"_{method}_impl", None)
            assert impl is not None, f"{cls.__name__}.{method} takes **kwargs and has no _{method}_impl to check"
            bound = inspect.signature(impl).bind(None, *args, **kwargs)
    return bound


class Recorder(TorchExecutor):
    """The torch executor, recording every (metadata, params) it plans for."""

    def __init__(self):
        self.calls = []

    def plan(self, meta, params, pool):
        self.calls.append((meta, params, pool))
        return super().plan(meta, params, pool)


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


# -- a stand-in FlashInfer: the real signatures, FlashInfer's semantics, torch arithmetic ------


def reference_paged_attention(q, cache, plan) -> torch.Tensor:
    """FlashInfer's paged attention, spelled out per row (fp32).

    KV length of a row: 0 with no pages, else `(pages - 1) * page_size + last_page_len`
    (page.cuh `get_length`). Query i of a row with qo_len new tokens sits at
    `kv_len - qo_len + i` (bottom-right causal) and sees keys `j <= pos` (causal) with
    `j >= pos - window_left` when window_left >= 0; with ALiBi `slope * (j - pos)` is added to the
    scaled scores; scores are soft-capped before masking.
    """
    qo_indptr, kv_indptr = plan["qo_indptr"].tolist(), plan["indptr"].tolist()
    indices, last = plan["indices"].tolist(), plan["last_page_len"].tolist()
    page_size, window, cap = plan["page_size"], plan["window_left"], plan["logits_soft_cap"]
    group = plan["num_qo_heads"] // plan["num_kv_heads"]
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:2], float("-inf"))
    for row in range(len(kv_indptr) - 1):
        pages = indices[kv_indptr[row]:kv_indptr[row + 1]]
        kv_len = 0 if not pages else (len(pages) - 1) * page_size + last[row]
        q_start, q_end = qo_indptr[row], qo_indptr[row + 1]
        if q_end == q_start:
            continue
        k_cache, v_cache = cache  # (k_cache, v_cache), each [pages, page_size, H, D]
        kv = torch.stack([k_cache[pages], v_cache[pages]]).float()
        kv = kv.reshape(2, -1, *k_cache.shape[-2:])[:, :kv_len]  # (2, M, H, D)
        k = kv[0].repeat_interleave(group, dim=1)
        v = kv[1].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * plan["sm_scale"]
        pos = kv_len - (q_end - q_start) + torch.arange(q_end - q_start)[:, None]
        keys = torch.arange(kv_len)[None]
        if plan["pos_encoding_mode"] == "ALIBI":  # variants.cuh: its own slopes, slope * (kv_idx - qo_idx)
            scores = scores + flashinfer.utils.get_alibi_slopes(q.shape[1])[:, None, None] * (keys - pos)
        if cap > 0:
            scores = cap * torch.tanh(scores / cap)
        mask = keys <= pos if plan["causal"] else torch.ones_like(keys <= pos)
        if window >= 0:
            mask &= keys >= pos - window
        scores = scores.masked_fill(~mask, float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        lse[q_start:q_end] = scores.logsumexp(-1).T / math.log(2)  # FlashInfer's LSE is base 2
    return out, lse


class FakeWrapper:
    """Binds every call against `REAL`'s signature and computes attention from the bound arguments."""

    REAL: type

    def __init__(self, *args, **kwargs):
        self.init = bind(self.REAL, "__init__", args, kwargs).arguments
        self.plans = self.runs = 0

    def plan(self, *args, **kwargs):
        bound = dict(bind(self.REAL, "plan", args, kwargs).arguments)
        if self.REAL is PREFILL:
            bound["indptr"], bound["indices"] = bound["paged_kv_indptr"], bound["paged_kv_indices"]
            bound["last_page_len"], bound["head_dim"] = bound["paged_kv_last_page_len"], bound["head_dim_qk"]
        else:  # one query per row, attending to its whole (windowed) KV
            bound["qo_indptr"] = torch.arange(len(bound["last_page_len"]) + 1, dtype=torch.int32)
            bound["causal"] = True
        for name in ("qo_indptr", "indptr", "last_page_len"):
            assert bound[name].dtype == torch.int32 and bound[name].device.type == "cpu", name
        assert bound["indices"].dtype == torch.int32
        self.planned = bound
        self.plans += 1

    def run(self, *args, **kwargs):
        bound = bind(self.REAL, "run", args, kwargs).arguments
        self.runs += 1
        q, cache = bound["q"], bound["paged_kv_cache"]
        assert isinstance(cache, tuple) and all(c.dtype == self.planned["kv_data_type"] for c in cache)
        assert q.dtype == self.planned["q_data_type"]
        assert q.shape == (int(self.planned["qo_indptr"][-1]), self.planned["num_qo_heads"], self.planned["head_dim"])
        out, lse = reference_paged_attention(q, cache, self.planned)
        return (out.to(q.dtype), lse) if bound.get("return_lse") else out.to(q.dtype)


def fake_merge_state(*args, **kwargs):
    """flashinfer.merge_state on base-2 LSEs, bound against the real signature."""
    bound = inspect.signature(flashinfer.merge_state).bind(*args, **kwargs).arguments
    v_a, s_a, v_b, s_b = bound["v_a"], bound["s_a"], bound["v_b"], bound["s_b"]
    assert s_a.dtype == s_b.dtype == torch.float32 and v_a.shape == v_b.shape and s_a.shape == v_a.shape[:2]
    top = torch.maximum(s_a, s_b)
    w_a, w_b = torch.exp2(s_a - top), torch.exp2(s_b - top)
    merged = (v_a.float() * w_a[..., None] + v_b.float() * w_b[..., None]) / (w_a + w_b)[..., None]
    return merged.to(v_a.dtype), top + torch.log2(w_a + w_b)


def fake_flashinfer() -> types.ModuleType:
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = type("FakeDecode", (FakeWrapper,), {"REAL": DECODE})
    module.BatchPrefillWithPagedKVCacheWrapper = type("FakePrefill", (FakeWrapper,), {"REAL": PREFILL})
    module.merge_state = fake_merge_state
    return module


class Comparer(TorchExecutor):
    """Runs the torch executor and the FlashInfer executor (on the stand-in) on each forward."""

    def __init__(self):
        self.flashinfer = FlashInferExecutor()
        self.num_compared = 0
        self.plan_types = []

    def plan(self, meta, params, pool):
        plan = self.flashinfer.plan(meta, params, pool)
        self.plan_types.append(type(plan).__name__)
        return super().plan(meta, params, pool), plan

    def run(self, q, layer_pool, plan):
        torch_plan, flashinfer_plan = plan
        expected = super().run(q, layer_pool, torch_plan)
        actual = self.flashinfer.run(q, layer_pool, flashinfer_plan)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        self.num_compared += 1
        return expected


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
    assert comparer.num_compared >= 2 * 7  # every layer of every forward


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
    from hf_paged.compile import compile_decode

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
