"""FlashInfer inside compiled decode steps: CUDA-graph decode wrappers on compile.py's fixed buffers.

Before each compiled decode step, outside the compiled and captured region,
`FlashInferExecutor.plan_decode(meta, cache)` plans, for every layer setting, a decode wrapper
built in CUDA-graph mode (`use_cuda_graph=True`) on the step's fixed-shape buffers
(`cache.buffers.kv_indptr / kv_indices / kv_last_page_len`, which the wrapper keeps and reads in
place), and publishes it in `PLANNED`. Inside the graph, `torch.ops.hf_paged.paged_attention(...,
backend="flashinfer")` calls `run_planned`, which looks the wrapper up by those buffers and the
layer setting and only runs it: nothing is planned inside the op (FlashInfer forbids planning
under graph capture). Re-planning before every replay is what FlashInfer's graph mode expects.

`register()` (called by every FlashInferExecutor) makes `run_planned` the op's "flashinfer" runner;
nothing is registered by importing this module.
"""

import weakref
from typing import Any

import torch

from .. import ops
from ..params import LayerParams
from .args import KERNEL_BACKEND, Args, kv_planes
from .support import serves_fp8

RUNNER = "flashinfer"  # the paged_attention backend name of run_planned


class PlannedWrappers:
    """The CUDA-graph decode wrappers planned for the next compiled step, by the step's buffers.

    Keyed by (address of the buffers' kv_indptr, layer setting): inside the op the runner sees only
    tensors and scalars, and the buffers' address is what names a compiled step's wrapper there.
    Values are the executors' WrapperRecords, held weakly: each executor owns its wrappers, and an
    entry dies with them. One per process (`PLANNED`), as the op and its runners are.
    """

    def __init__(self) -> None:
        self._records: "weakref.WeakValueDictionary[tuple[int, LayerParams], Any]" = weakref.WeakValueDictionary()

    def publish(self, kv_indptr: torch.Tensor, params: LayerParams, record: Any) -> None:
        """Make the planned wrapper `record` the one `run_planned` uses for these buffers and params."""
        self._records[(kv_indptr.data_ptr(), params)] = record

    def get(self, kv_indptr: torch.Tensor, params: LayerParams) -> Any:
        """The record published for these buffers and params, or None."""
        return self._records.get((kv_indptr.data_ptr(), params))


PLANNED = PlannedWrappers()


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


def run_planned(
    q: torch.Tensor, kv_pool: torch.Tensor, index: ops.PagedIndex, max_q: int, max_kv: int, params: LayerParams,
    scales: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The "flashinfer" runner of `paged_attention` (an ops.Runner): q `[rows, H_q, D]` ->
    `[rows, H_q, D]` in q's dtype. The planned wrapper holds the index; only its address is read.
    fp8 pages: run with the layer's `scales`; a head dim FlashInfer does not read from fp8 runs the
    torch runner (support.serves_fp8), as the eager steps do."""
    if scales is not None and not serves_fp8(params.head_dim):
        return ops.run_torch(q, kv_pool, index, max_q, max_kv, params, scales)
    record = PLANNED.get(index.kv_indptr, params)
    if record is None:
        raise RuntimeError(
            f"no FlashInfer decode wrapper is planned for these buffers and {params}; "
            "FlashInferExecutor.plan_decode(meta, cache) must run before each compiled decode step"
        )
    kwargs = {} if scales is None else {"k_scale": scales[0], "v_scale": scales[1]}
    return record.wrapper.run(q.to(record.dtype), kv_planes(kv_pool), **kwargs).to(q.dtype)


def register() -> None:
    """Make `run_planned` the "flashinfer" runner of `torch.ops.hf_paged.paged_attention`."""
    ops.RUNNERS.register(RUNNER, run_planned)
