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
- A wrapper holds the plan of one layer setting (`LayerParams`): models whose layers differ
  (sliding-window and full layers) get one wrapper per setting and kind.
- Compiled decode steps (`PagedConfig(compile=True)`): `plan_decode` plans CUDA-graph decode
  wrappers on compile.py's fixed buffers, run inside the graph by the op runner of flashinfer_graph.py.
- Shared-prefix (cascade) attention lives in flashinfer_cascade.py and runs when `meta.cascade`;
  for this executor that needs an explicit `PagedConfig(cascade=True)` (not yet run on a GPU).
"""

import contextlib
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

from ..metadata import ForwardMetadata
from ..pool import KVPool
from .flashinfer_support import import_flashinfer
from .params import LayerParams

WORKSPACE_BYTES = 128 << 20
KERNEL_BACKEND = "fa2"
WRAPPER_CLASSES = {"decode": "BatchDecodeWithPagedKVCacheWrapper", "prefill": "BatchPrefillWithPagedKVCacheWrapper"}

Args = tuple[tuple[Any, ...], dict[str, Any]]


# -- argument building (pure: CPU tests bind these against FlashInfer's signatures) -------------


@dataclass(slots=True)
class HostIndices:
    """Host copies (int32, CPU) of the metadata's device tensors of the same names.

    qo_indptr [rows + 1], kv_indptr [rows + 1], kv_last_page_len [rows].
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor


def host_indices(meta: ForwardMetadata, pin_memory: bool = False) -> HostIndices:
    """Build the host index arrays from `meta`'s host lists (no device read).

    A row's page table holds exactly `ceil(kv_len / page_size)` pages (see PageTables).
    """
    page_size = meta.page_size
    num_pages = [-(-n // page_size) for n in meta.kv_lens]
    last_page_len = [(n - 1) % page_size + 1 if n else 0 for n in meta.kv_lens]

    def tensor(values: list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.int32)
        return host.pin_memory() if pin_memory else host

    qo_indptr, kv_indptr = [0, *accumulate(meta.qo_lens)], [0, *accumulate(num_pages)]
    return HostIndices(tensor(qo_indptr), tensor(kv_indptr), tensor(last_page_len))


def alibi_mode(params: LayerParams) -> str:
    """`pos_encoding_mode` for `params`: "ALIBI" or "NONE" (transformers applies RoPE itself).

    FlashInfer's ALiBi takes no slopes: its kernels read `flashinfer.utils.get_alibi_slopes(H_q)`,
    the standard ones (Bloom, Falcon, MPT with alibi_bias_max 8). Other slopes raise ValueError.
    """
    if not params.alibi_slopes:
        return "NONE"
    from flashinfer.utils import get_alibi_slopes

    builtin = get_alibi_slopes(params.num_qo_heads).tolist()
    if any(abs(a - b) > 1e-6 * abs(b) for a, b in zip(params.alibi_slopes, builtin, strict=True)):
        raise ValueError(
            "FlashInfer's ALiBi uses the standard slopes 2^(-8k/H); this model's differ: wrap it with backend='torch'"
        )
    return "ALIBI"


def _common_kwargs(params: LayerParams, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "pos_encoding_mode": alibi_mode(params),
        "window_left": params.window_left,
        "logits_soft_cap": params.logits_soft_cap,
        "q_data_type": dtype,
        "kv_data_type": dtype,
        "sm_scale": params.sm_scale,
    }


def decode_plan_args(meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, host: HostIndices) -> Args:
    """Arguments of `BatchDecodeWithPagedKVCacheWrapper.plan` (and `.workspace_size`)."""
    # indptr [rows + 1] and last_page_len [rows] int32 on the CPU; indices [num_table_pages] int32 on the device.
    args = (host.kv_indptr, meta.kv_indices, host.kv_last_page_len)
    args += (params.num_qo_heads, params.num_kv_heads, params.head_dim, meta.page_size)
    return args, _common_kwargs(params, dtype)


def prefill_plan_args(meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, host: HostIndices) -> Args:
    """Arguments of `BatchPrefillWithPagedKVCacheWrapper.plan` (and `.workspace_size`)."""
    # As decode, plus qo_indptr [rows + 1] int32 on the CPU; head_dim is head_dim_qk (= head_dim_vo).
    args = (host.qo_indptr, host.kv_indptr, meta.kv_indices, host.kv_last_page_len)
    args += (params.num_qo_heads, params.num_kv_heads, params.head_dim, meta.page_size)
    return args, {"causal": True, **_common_kwargs(params, dtype)}


def wrapper_args(kind: str, workspace: torch.Tensor) -> Args:
    """Constructor arguments of the decode (`kind="decode"`) or prefill wrapper."""
    kwargs: dict[str, Any] = {"kv_layout": "NHD", "backend": KERNEL_BACKEND}
    if kind == "decode":
        kwargs["use_tensor_cores"] = True
    return (workspace,), kwargs


def run_args(q: torch.Tensor, layer_pool: torch.Tensor, dtype: torch.dtype) -> Args:
    """Arguments of `wrapper.run`: q `[nnz, H_q, D]` in the planned dtype, and the layer's pool
    `[2, num_pages + 1, page_size, H_kv, D]` as FlashInfer's `(k_cache, v_cache)` pair (each NHD)."""
    return (q.to(dtype).contiguous(), kv_planes(layer_pool)), {}


def kv_planes(layer_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value planes `[num_pages + 1, page_size, H_kv, D]` of a layer pool."""
    return layer_pool[0], layer_pool[1]


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current while FlashInfer launches on it (layers spread over several GPUs)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# -- the executor --------------------------------------------------------------------------------


@dataclass(slots=True, weakref_slot=True)
class _Wrapper:
    """A long-lived FlashInfer wrapper, the dtype of its last plan, and that plan's copy event."""

    wrapper: Any
    dtype: torch.dtype | None = None
    planned: Any = None  # torch.cuda.Event recorded after the plan's host-to-device copy


@dataclass(slots=True)
class _DeviceState:
    workspace: torch.Tensor  # [bytes] uint8, zero-filled, shared by every wrapper on the device
    # (kind, params) -> wrapper; ("graph", buffer address, params) for compiled decode steps
    wrappers: dict[tuple, _Wrapper] = field(default_factory=dict)
    settings: set[LayerParams] = field(default_factory=set)  # every layer setting planned so far
    retired: list[torch.Tensor] = field(default_factory=list)  # old workspaces captured graphs may read


@dataclass(slots=True)
class FlashInferPlan:
    """A planned wrapper for one forward and layer setting; wrapper None when there is no new token."""

    wrapper: Any
    dtype: torch.dtype
    kind: str
    params: LayerParams


class FlashInferExecutor:
    """The CUDA executor: FlashInfer's paged prefill and decode kernels on the pool's pages."""

    name = "flashinfer"

    def __init__(self) -> None:
        self._devices: dict[torch.device, _DeviceState] = {}

    def plan(self, meta: ForwardMetadata, params: LayerParams, pool: KVPool) -> Any:
        """Plan the wrapper(s) for `params` on `meta`'s device: a FlashInferPlan, or a cascade plan
        when `meta.cascade` and rows share a prefix worth it. Never reads device memory."""
        device = meta.kv_indptr.device
        dtype = next((spec.dtype for spec in pool.specs if spec.device == device), pool.specs[0].dtype)
        kind = "decode" if meta.is_decode else "prefill"
        state = self._state(device)
        state.settings.add(params)
        if sum(meta.qo_lens) == 0:
            return FlashInferPlan(None, dtype, kind, params)
        if meta.cascade and not params.alibi_slopes:  # the cascade path plans without ALiBi
            shared = flashinfer_cascade.plan(self, meta, params, dtype)
            if shared is not None:
                return shared
        build = decode_plan_args if kind == "decode" else prefill_plan_args
        args, kwargs = build(meta, params, dtype, host_indices(meta, pin_memory=device.type == "cuda"))
        return FlashInferPlan(self.plan_wrapper(device, (kind, params), args, kwargs, dtype), dtype, kind, params)

    def plan_wrapper(self, device: torch.device, key: tuple, args: tuple, kwargs: dict, dtype: torch.dtype) -> Any:
        """Plan (creating it once) the wrapper `key` = (kind, params), kind "decode", "prefill" or
        "prefix" (cascade), on `device`; returns the FlashInfer wrapper."""
        state = self._state(device)
        with _device_guard(device):
            kind = "decode" if key[0] == "decode" else "prefill"
            record = self._wrapper(state, key, wrapper_args(kind, state.workspace))
            self._plan(device, record, args, kwargs, dtype)
        return record.wrapper

    def run(self, q: torch.Tensor, layer_pool: torch.Tensor, plan: FlashInferPlan) -> torch.Tensor:
        """Attention of `q [nnz, H_q, D]` on one layer's pool; returns `[nnz, H_q, D]` in q's dtype."""
        with _device_guard(q.device):
            if isinstance(plan, flashinfer_cascade.FlashInferCascadePlan):
                return flashinfer_cascade.run(q, layer_pool, plan).to(q.dtype)
            if plan.wrapper is None:
                return q.new_empty(q.shape)
            args, kwargs = run_args(q, layer_pool, plan.dtype)
            return plan.wrapper.run(*args, **kwargs).to(q.dtype)

    def plan_decode(self, meta: ForwardMetadata, cache: Any) -> None:
        """Before a compiled decode step (compile.py): plan, for every layer setting planned so far,
        a CUDA-graph decode wrapper on the step's fixed buffers `cache.buffers`, which the
        "flashinfer" runner of `torch.ops.hf_paged.paged_attention` then runs (flashinfer_graph.py)."""
        buffers = cache.buffers
        device = buffers.kv_indptr.device
        dtype = cache.pools[0].dtype
        state = self._state(device)
        host = host_indices(meta, pin_memory=device.type == "cuda")
        with _device_guard(device):
            for params in state.settings:
                record = self._wrapper(
                    state, ("graph", buffers.kv_indptr.data_ptr(), params),
                    flashinfer_graph.graph_wrapper_args(buffers, state.workspace),
                )
                self._plan(device, record, *decode_plan_args(meta, params, dtype, host), dtype)
                flashinfer_graph.publish(buffers.kv_indptr, params, record)

    def _state(self, device: torch.device) -> _DeviceState:
        state = self._devices.get(device)
        if state is None:
            workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            state = self._devices[device] = _DeviceState(workspace)
        return state

    def _wrapper(self, state: _DeviceState, key: tuple, constructor_args: Args) -> _Wrapper:
        record = state.wrappers.get(key)
        if record is None:
            kind = "decode" if key[0] in ("decode", "graph") else "prefill"  # "prefix": cascade's prefix level
            cls = getattr(import_flashinfer(), WRAPPER_CLASSES[kind])
            args, kwargs = constructor_args
            record = state.wrappers[key] = _Wrapper(cls(*args, **kwargs))
        return record

    def _plan(self, device: torch.device, record: _Wrapper, args: tuple, kwargs: dict, dtype: torch.dtype) -> None:
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

    def _grow_workspace(self, device: torch.device, record: _Wrapper, args: tuple, kwargs: dict) -> None:
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


# Last: both import this module. flashinfer_graph registers the "flashinfer" paged_attention runner.
from . import flashinfer_cascade, flashinfer_graph  # noqa: E402
