"""FlashInfer inside compiled decode steps: CUDA-graph decode wrappers on compile.py's fixed buffers.

Before each compiled decode step, outside the compiled and captured region,
`FlashInferExecutor.plan_decode(meta, cache)` plans, for every layer setting, a decode wrapper
built in CUDA-graph mode (`use_cuda_graph=True`) on the step's fixed-shape buffers
(`cache.buffers.kv_indptr / kv_indices / kv_last_page_len`, which the wrapper keeps and reads in
place), and publishes it here. Inside the graph, `torch.ops.hf_paged.paged_attention(...,
backend="flashinfer")` calls `run_planned`, which looks the wrapper up by those buffers and the
layer setting and only runs it: nothing is planned inside the op (FlashInfer forbids planning
under graph capture). Re-planning before every replay is what FlashInfer's graph mode expects.
"""

import weakref
from typing import Any

import torch

from . import ops
from .flashinfer_backend import KERNEL_BACKEND, Args, kv_planes
from .params import LayerParams

# (address of the buffers' kv_indptr, layer setting) -> the planned _Wrapper record. Weak: the
# executor owns its wrappers; an entry dies with them.
_PLANNED: "weakref.WeakValueDictionary[tuple[int, LayerParams], Any]" = weakref.WeakValueDictionary()


def graph_wrapper_args(buffers: Any, workspace: torch.Tensor) -> Args:
    """Constructor arguments of a CUDA-graph `BatchDecodeWithPagedKVCacheWrapper` on `buffers`.

    kv_indptr [rows + 1], kv_indices [rows * pages_per_row], kv_last_page_len [rows], all int32
    on the device; the batch size (rows) is fixed for the wrapper's life.
    """
    return (workspace,), {
        "kv_layout": "NHD",
        "use_cuda_graph": True,
        "use_tensor_cores": True,
        "paged_kv_indptr_buffer": buffers.kv_indptr,
        "paged_kv_indices_buffer": buffers.kv_indices,
        "paged_kv_last_page_len_buffer": buffers.kv_last_page_len,
        "backend": KERNEL_BACKEND,
    }


def publish(kv_indptr: torch.Tensor, params: LayerParams, record: Any) -> None:
    """Make the planned wrapper `record` the one `run_planned` uses for these buffers and params."""
    _PLANNED[(kv_indptr.data_ptr(), params)] = record


def run_planned(
    q: torch.Tensor, kv_pool: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, max_q: int, max_kv: int,
    sm_scale: float, window_left: int, logits_soft_cap: float, alibi_slopes: list[float] | None = None,
) -> torch.Tensor:
    """The "flashinfer" runner of `paged_attention`: q `[rows, H_q, D]` -> `[rows, H_q, D]` in q's dtype."""
    slopes = tuple(alibi_slopes) if alibi_slopes else None
    params = LayerParams(q.shape[1], kv_pool.shape[3], q.shape[2], sm_scale, window_left, logits_soft_cap, slopes)
    record = _PLANNED.get((kv_indptr.data_ptr(), params))
    if record is None:
        raise RuntimeError(
            f"no FlashInfer decode wrapper is planned for these buffers and {params}; "
            "FlashInferExecutor.plan_decode(meta, cache) must run before each compiled decode step"
        )
    return record.wrapper.run(q.to(record.dtype), kv_planes(kv_pool)).to(q.dtype)


ops.register_runner("flashinfer", run_planned)
