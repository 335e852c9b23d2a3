"""FlashInfer executor (CUDA): plan once per forward and layer setting, run per layer.

Reads exactly the ForwardMetadata the torch executor reads. FlashInfer is imported lazily (on
the first plan), so `import hf_paged` stays fast and works without it or without a GPU.

- A decode forward (`meta.is_decode`: one new token per row, no padding) plans the paged decode
  wrapper with tensor cores (any GQA group size); every other forward (prompts, ragged
  `qo_indptr`, rows without new tokens) the paged prefill wrapper with `causal=True`, which is
  bottom-right aligned as the cache needs (K/V are written before attention runs). Both are pinned
  to FA2 (`backend="fa2"`): "auto" picks FA3 (Hopper prefill) or cuDNN, other numerics and modules.
- `plan()` gets host copies (CPU int32, pinned on CUDA) of `qo_indptr`, `kv_indptr` and
  `kv_last_page_len` built from the metadata's host lists, so planning never waits on the GPU;
  `kv_indices` stays on the device, where FlashInfer keeps it without reading it.
- A row with no token has 0 pages and `kv_last_page_len` 0. FlashInfer's kernels give a row with
  0 pages length 0 whatever its last-page length, and its host planner computes
  `max(pages - 1, 0) * page_size + last_page_len`: 0 is the value on which both agree (vLLM's
  padding value 1 would count one token). Such rows have no new token (prefill forwards only).
- One zero-filled float workspace per device (128 MiB), shared by its wrappers (they never run
  concurrently). A plan that overflows it asks FlashInfer for the exact size, grows it and replans.
- A wrapper holds the plan of one layer setting (`LayerParams`) on one group's pages (groups.py,
  `meta.group`): models whose layers differ (sliding-window and full layers) get one wrapper per
  setting, group and kind. Two groups may share a setting (in a prompt forward, layers whose
  attention ignores their cache's window, as Moshi's) but never pages or page size, so the group is
  part of the key.
- Compiled decode steps (`PagedConfig(compile=True)`): `plan_decode` plans CUDA-graph decode
  wrappers on compile.py's fixed buffers, run inside the graph by the op runner of graph.py, which
  the executor registers (`graph.register()`) when it is created.
- Shared-prefix (cascade) attention lives in cascade.py; `plan` takes it when `meta.cascade` and
  rows share a prefix worth it. For this executor that needs an explicit
  `PagedConfig(cascade=True)` (`cascade_by_default` False: not yet run on a GPU).
- fp8 pages (PagedConfig.kv_cache_dtype, memory/kv_quant.py): the wrappers are planned with
  `kv_data_type` the pages' dtype and run with the layer's `k_scale`, `v_scale`. A layer setting
  whose head dim FlashInfer's kernels do not read from fp8 (support.serves_fp8) is planned and run
  by the torch executor instead, on the same pages; cascade is not taken with fp8 pages (its two
  levels would need the scales too: not built). docs/fp8.md.
"""

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ...memory.pool import KVPool
from .. import torch as torch_executor
from ..metadata import ForwardMetadata
from ..params import LayerParams
from . import cascade, graph
from .args import (
    WRAPPER_CLASS_OF,
    WRAPPER_CLASSES,
    Args,
    decode_plan_args,
    host_indices,
    kv_planes,
    plan_args,
    run_args,
    wrapper_args,
    wrapper_kind,
)
from .support import import_flashinfer, serves_fp8

WORKSPACE_BYTES = 128 << 20


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current while FlashInfer launches on it (layers spread over several GPUs)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass(slots=True, weakref_slot=True)
class WrapperRecord:
    """A long-lived FlashInfer wrapper, the dtype of its last plan, and that plan's copy event.

    graph.py's runner reads `wrapper` and `dtype` of the records `plan_decode` publishes."""

    wrapper: Any
    dtype: torch.dtype | None = None
    planned: Any = None  # torch.cuda.Event recorded after the plan's host-to-device copy


@dataclass(slots=True)
class _DeviceState:
    workspace: torch.Tensor  # [bytes] uint8, zero-filled, shared by every wrapper on the device
    # (kind, params, group) -> wrapper; ("graph", buffer address, params) for compiled decode steps
    wrappers: dict[tuple, WrapperRecord] = field(default_factory=dict)
    settings: set[LayerParams] = field(default_factory=set)  # every layer setting planned so far
    retired: list[torch.Tensor] = field(default_factory=list)  # old workspaces captured graphs may read


@dataclass(slots=True)
class FlashInferPlan:
    """A planned wrapper for one forward and layer setting; wrapper None when there is no new token."""

    wrapper: Any
    dtype: torch.dtype
    kind: str
    params: LayerParams
    device_index: int | None = None  # the CUDA device run() makes current when it is not (None: CPU)


class FlashInferExecutor:
    """The CUDA executor: FlashInfer's paged prefill and decode kernels on the pool's pages."""

    name = "flashinfer"
    cascade_by_default = False  # cascade.py has not been run on a GPU yet
    reads_in_place = False  # reads pages where they are: a page reservation would buy nothing
    op_runner = graph.RUNNER

    def __init__(self) -> None:
        self._devices: dict[torch.device, _DeviceState] = {}
        # id(layer pool) -> (weak reference to it, its (k_cache, v_cache) planes)
        self._layer_planes: dict[int, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]]] = {}
        graph.register()  # compiled decode steps call graph.run_planned through the op

    def plan(self, meta: ForwardMetadata, params: LayerParams, pool: KVPool) -> Any:
        """Plan the wrapper(s) for `params` on `meta`'s device: a FlashInferPlan, or a cascade plan
        when `meta.cascade` and rows share a prefix worth it. Never reads device memory."""
        device = meta.device
        spec = next((spec for spec in pool.specs if spec.device == device), pool.specs[0])
        dtype = spec.dtype
        kv_dtype = spec.kv_dtype  # fp8 pages, else None
        if kv_dtype is not None and not serves_fp8(params.head_dim):  # the torch executor reads these
            return torch_executor.plan(meta, params, pool.zero_page_id)
        kind = wrapper_kind(meta)
        state = self._state(device)
        state.settings.add(params)
        if sum(meta.qo_lens) == 0:
            return FlashInferPlan(None, dtype, kind, params)
        if meta.cascade and not params.alibi_slopes and kv_dtype is None:  # the cascade path plans without ALiBi
            shared = cascade.plan(self.plan_wrapper, meta, params, dtype)
            if shared is not None:
                return shared
        args, kwargs = plan_args(meta, params, dtype, kv_dtype)
        wrapper = self.plan_wrapper(device, (kind, params, meta.group), args, kwargs, dtype)
        return FlashInferPlan(wrapper, dtype, kind, params, device.index if device.type == "cuda" else None)

    def advance_plan(self, plan: Any, meta: ForwardMetadata) -> None:
        """Every step plans its wrappers (they take the new lengths on the host): never carried over."""
        return None

    def plan_wrapper(self, device: torch.device, key: tuple, args: tuple, kwargs: dict, dtype: torch.dtype) -> Any:
        """Plan (creating it once) the wrapper `key` = (kind, params, group), kind "decode", "prefill"
        or "prefix" (cascade), on `device`; returns the FlashInfer wrapper."""
        state = self._state(device)
        # The wrappers, their buffers and the workspace outlive this call: made and refilled as
        # normal tensors even inside torch.inference_mode() (as the pool, memory/pool.py).
        with _device_guard(device), torch.inference_mode(False):
            record = self._wrapper(state, key, wrapper_args(WRAPPER_CLASS_OF[key[0]], state.workspace))
            self._plan(device, record, args, kwargs, dtype)
        return record.wrapper

    def run(self, q: torch.Tensor, layer_pool: torch.Tensor, plan: FlashInferPlan,
            scales: tuple[float, float] | None = None) -> torch.Tensor:
        """Attention of `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]` in q's dtype
        (`scales`: fp8 pages' (k_scale, v_scale)).

        Runs per layer and step: a planned wrapper on the current device goes straight to
        `wrapper.run`, with the pool's planes viewed once per pool (`_planes`)."""
        if type(plan) is FlashInferPlan and plan.wrapper is not None and (
            plan.device_index is None or plan.device_index == torch.cuda.current_device()
        ):
            args, kwargs = run_args(q, layer_pool, plan.dtype, self._planes(layer_pool), scales)
            out = plan.wrapper.run(*args, **kwargs)
            return out if out.dtype == q.dtype else out.to(q.dtype)
        with _device_guard(q.device):
            if isinstance(plan, cascade.FlashInferCascadePlan):
                return cascade.run(q, layer_pool, plan).to(q.dtype)
            if not isinstance(plan, FlashInferPlan):  # fp8 pages of a head dim FlashInfer does not read
                return torch_executor.run(q, layer_pool, plan, scales)
            if plan.wrapper is None:
                return q.new_empty(q.shape)
            args, kwargs = run_args(q, layer_pool, plan.dtype, scales=scales)
            return plan.wrapper.run(*args, **kwargs).to(q.dtype)

    def plan_decode(self, meta: ForwardMetadata, cache: Any) -> None:
        """Before a compiled decode step (compile.py): plan, for every layer setting planned so far,
        a CUDA-graph decode wrapper on the step's fixed buffers `cache.buffers`, which the
        "flashinfer" runner of `torch.ops.hf_paged.paged_attention` then runs (graph.py)."""
        buffers = cache.buffers
        device = buffers.kv_indptr.device
        dtype = cache.dtype
        kv_dtype = cache.pools[0].dtype if cache.kv_quant is not None else None
        state = self._state(device)
        host = host_indices(meta, pin_memory=device.type == "cuda")
        with _device_guard(device), torch.inference_mode(False):  # (as in plan_wrapper)
            for params in state.settings:  # (fp8 settings FlashInfer does not read never get here: plan)
                record = self._wrapper(
                    state, ("graph", buffers.kv_indptr.data_ptr(), params),
                    graph.graph_wrapper_args(buffers, state.workspace),
                )
                self._plan(device, record, *decode_plan_args(meta, params, dtype, host, kv_dtype), dtype)
                graph.PLANNED.publish(buffers.kv_indptr, params, record)

    def _planes(self, layer_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`kv_planes(layer_pool)`, made once per layer pool (held weakly: a replaced pool is freed)."""
        entry = self._layer_planes.get(id(layer_pool))
        if entry is None or entry[0]() is not layer_pool:
            if len(self._layer_planes) > 4096:  # pools were replaced many times: drop the dead entries
                self._layer_planes = {k: e for k, e in self._layer_planes.items() if e[0]() is not None}
            entry = self._layer_planes[id(layer_pool)] = (weakref.ref(layer_pool), kv_planes(layer_pool))
        return entry[1]

    def _state(self, device: torch.device) -> _DeviceState:
        state = self._devices.get(device)
        if state is None:
            with torch.inference_mode(False):  # kept for the executor's life (see plan_wrapper)
                workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            state = self._devices[device] = _DeviceState(workspace)
        return state

    def _wrapper(self, state: _DeviceState, key: tuple, constructor_args: Args) -> WrapperRecord:
        record = state.wrappers.get(key)
        if record is None:
            cls = getattr(import_flashinfer(), WRAPPER_CLASSES[WRAPPER_CLASS_OF[key[0]]])
            args, kwargs = constructor_args
            record = state.wrappers[key] = WrapperRecord(cls(*args, **kwargs))
        return record

    def _plan(self, device: torch.device, record: WrapperRecord, args: tuple, kwargs: dict, dtype: torch.dtype) -> None:
        if record.planned is not None:
            # plan() refills the wrapper's pinned buffer and copies it asynchronously: wait for the
            # previous plan's copy (not for the whole previous forward).
            record.planned.synchronize()
        try:
            record.wrapper.plan(*args, **kwargs)
        except Exception as exc:
            if "Buffer overflow" not in str(exc):
                raise
            self._grow_workspace(device, record, args, kwargs)
            record.wrapper.plan(*args, **kwargs)
        record.dtype = dtype
        if device.type == "cuda":
            record.planned = record.planned or torch.cuda.Event()
            record.planned.record()

    def _grow_workspace(self, device: torch.device, record: WrapperRecord, args: tuple, kwargs: dict) -> None:
        """Give every wrapper on `device` a float workspace as large as this plan needs."""
        state = self._devices[device]
        float_bytes, int_bytes = record.wrapper.workspace_size(*args, **kwargs)
        size = max(int(float_bytes), 2 * state.workspace.numel())
        state.retired.append(state.workspace)
        state.workspace = torch.zeros(size, dtype=torch.uint8, device=device)
        for other in state.wrappers.values():
            # FlashInfer's own int workspace (8 MiB) is kept unless this plan needs more.
            int_buffer = other.wrapper._int_workspace_buffer
            if other is record and int_buffer.numel() < int_bytes:
                int_buffer = torch.empty(int(int_bytes), dtype=torch.uint8, device=device)
            other.wrapper.reset_workspace_buffer(state.workspace, int_buffer)

