"""A stand-in for FlashInfer: its real signatures (every call is bound against the installed
FlashInfer's), FlashInfer's documented semantics, torch arithmetic. Import it after
`pytest.importorskip("flashinfer")`.
"""

import inspect
import math
import types

import flashinfer
import torch

from hf_paged.attention import TorchExecutor
from hf_paged.attention.flashinfer.executor import FlashInferExecutor

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


def reference_paged_attention(q, cache, plan, k_scale=None, v_scale=None) -> torch.Tensor:
    """FlashInfer's paged attention, spelled out per row (fp32); fp8 pages read as stored x k_scale
    (v_scale), which is what folding k_scale into sm_scale and v_scale into the output computes.

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
        kv = torch.stack([k_cache[pages].float(), v_cache[pages].float()])
        kv = kv.reshape(2, -1, *k_cache.shape[-2:])[:, :kv_len]  # (2, M, H, D)
        k = kv[0].repeat_interleave(group, dim=1) * (1.0 if k_scale is None else k_scale)
        v = kv[1].repeat_interleave(group, dim=1) * (1.0 if v_scale is None else v_scale)
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
        out, lse = reference_paged_attention(q, cache, self.planned, bound.get("k_scale"), bound.get("v_scale"))
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

    def run(self, q, layer_pool, plan, scales=None):
        torch_plan, flashinfer_plan = plan
        expected = super().run(q, layer_pool, torch_plan, scales)
        actual = self.flashinfer.run(q, layer_pool, flashinfer_plan, scales)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        self.num_compared += 1
        return expected
