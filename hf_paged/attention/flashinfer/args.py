"""Arguments of FlashInfer's wrapper calls, built from the ForwardMetadata.

Pure functions, no FlashInfer import: the CPU tests bind every result against the installed
FlashInfer's real signatures (tests/test_flashinfer_stand_in.py).
"""

from dataclasses import dataclass
from typing import Any

import torch

from ..metadata import ForwardMetadata, cumsum, host_tensor, last_page_lens
from ..params import LayerParams

KERNEL_BACKEND = "fa2"
WRAPPER_CLASSES = {"decode": "BatchDecodeWithPagedKVCacheWrapper", "prefill": "BatchPrefillWithPagedKVCacheWrapper"}
# Wrapper kinds the executor keeps ("graph": compiled decode steps, "prefix": cascade's prefix
# level) -> the FlashInfer wrapper class (WRAPPER_CLASSES key) each is an instance of.
WRAPPER_CLASS_OF = {"decode": "decode", "graph": "decode", "prefill": "prefill", "prefix": "prefill"}

Args = tuple[tuple[Any, ...], dict[str, Any]]


def wrapper_kind(meta: ForwardMetadata) -> str:
    """"decode" for a decode forward (`meta.is_decode`: one new token per row, no padding), else
    "prefill" (prompts, ragged `qo_indptr`, rows without new tokens)."""
    return "decode" if meta.is_decode else "prefill"


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
    return HostIndices(
        host_tensor(cumsum(meta.qo_lens), pin_memory=pin_memory),
        host_tensor(cumsum(num_pages), pin_memory=pin_memory),
        host_tensor(last_page_lens(meta.kv_lens, page_size), pin_memory=pin_memory),
    )


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


def layer_kwargs(params: LayerParams, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The keyword arguments of every `plan` call that come from the layer setting and dtype
    (`kv_dtype`: the pages' when they hold fp8, memory/kv_quant.py; None: `dtype`)."""
    return {
        "pos_encoding_mode": alibi_mode(params),
        "window_left": params.window_left,
        "logits_soft_cap": params.logits_soft_cap,
        "q_data_type": dtype,
        "kv_data_type": kv_dtype or dtype,
        "sm_scale": params.sm_scale,
    }


def decode_plan_args(meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, host: HostIndices,
                     kv_dtype: torch.dtype | None = None) -> Args:
    """Arguments of `BatchDecodeWithPagedKVCacheWrapper.plan` (and `.workspace_size`)."""
    # indptr [rows + 1] and last_page_len [rows] int32 on the CPU; indices [num_table_pages] int32 on the device.
    args = (host.kv_indptr, meta.kv_indices, host.kv_last_page_len)
    args += (params.num_qo_heads, params.num_kv_heads, params.head_dim, meta.page_size)
    return args, layer_kwargs(params, dtype, kv_dtype)


def prefill_plan_args(meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, host: HostIndices,
                      kv_dtype: torch.dtype | None = None) -> Args:
    """Arguments of `BatchPrefillWithPagedKVCacheWrapper.plan` (and `.workspace_size`)."""
    # As decode, plus qo_indptr [rows + 1] int32 on the CPU; head_dim is head_dim_qk (= head_dim_vo).
    args = (host.qo_indptr, host.kv_indptr, meta.kv_indices, host.kv_last_page_len)
    args += (params.num_qo_heads, params.num_kv_heads, params.head_dim, meta.page_size)
    return args, {"causal": True, **layer_kwargs(params, dtype, kv_dtype)}


def plan_args(meta: ForwardMetadata, params: LayerParams, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> Args:
    """`plan` arguments of the `wrapper_kind(meta)` wrapper, host arrays pinned on CUDA."""
    build = decode_plan_args if wrapper_kind(meta) == "decode" else prefill_plan_args
    return build(meta, params, dtype, host_indices(meta, pin_memory=meta.device.type == "cuda"), kv_dtype)


def wrapper_args(kind: str, workspace: torch.Tensor) -> Args:
    """Constructor arguments of the decode (`kind="decode"`) or prefill wrapper."""
    kwargs: dict[str, Any] = {"kv_layout": "NHD", "backend": KERNEL_BACKEND}
    if kind == "decode":
        kwargs["use_tensor_cores"] = True
    return (workspace,), kwargs


def run_args(
    q: torch.Tensor, layer_pool: torch.Tensor, dtype: torch.dtype, planes: tuple[torch.Tensor, torch.Tensor] | None = None,
    scales: tuple[float, float] | None = None,
) -> Args:
    """Arguments of `wrapper.run`: q `[nnz, H_q, D]` in the planned dtype, and the layer's pool
    `[2, num_pages + 1, page_size, H_kv, D]` as FlashInfer's `(k_cache, v_cache)` pair (each NHD;
    `planes`: that pair, when the caller keeps it); fp8 pages' `scales` as `k_scale`, `v_scale`
    (FlashInfer folds k_scale into the softmax scale and multiplies the output by v_scale). Per layer
    and step: converts only what needs it."""
    if q.dtype != dtype:
        q = q.to(dtype)
    if not q.is_contiguous():
        q = q.contiguous()
    kwargs = {} if scales is None else {"k_scale": scales[0], "v_scale": scales[1]}
    return (q, kv_planes(layer_pool) if planes is None else planes), kwargs


def kv_planes(layer_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value planes `[num_pages + 1, page_size, H_kv, D]` of a layer pool."""
    return layer_pool[0], layer_pool[1]
