"""The paged executors as `torch.library` custom ops, so compiled, exported and scripted code can call them.

Two ops, both opaque to torch.compile (dynamo records a call, never traces inside):

* `torch.ops.hf_paged.paged_attention(q, kv_pool, qo_indptr, kv_indptr, kv_indices,
  kv_last_page_len, max_q, max_kv, sm_scale, window_left, logits_soft_cap, backend,
  alibi_slopes=None, k_scale=1.0, v_scale=1.0) -> out` (the scales: fp8 pages, memory/kv_quant.py)
* `torch.ops.hf_paged.write_kv(kv_pool, key, value, slot_mapping) -> None` (mutates `kv_pool`)

They take tensors in FlashInfer's paged format and plain scalars; nothing else. `max_q` and `max_kv`
are upper bounds (any value >= the real maxima gives the same result), so a caller may pass fixed
capacities and fixed-shape index buffers: that is how a compiled decode step keeps one graph while
sequences grow (see hf_paged/integration/compile.py). `kv_indices` may be longer than `kv_indptr[-1]`; the tail
is never used.

`backend` picks the runner from `RUNNERS`. "torch" is built in: it derives the gather indices and
the mask from the index tensors on every call (cheap next to the K/V gather) and runs the torch
executor's plain path. Other executors register theirs (`RUNNERS.register`, e.g. FlashInfer's
`graph.register()` when its executor is created) and name it in their `op_runner`; a runner may
use state it planned earlier, outside any compiled or captured region (FlashInfer: the wrapper
planned on the same buffers), but must not plan inside the op.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..memory.kv_quant import as_bytes
from .params import LayerParams
from .torch import dense, masks, reads


@dataclass(slots=True)
class PagedIndex:
    """The index tensors of a ForwardMetadata that `masks.token_slots`/`attention_mask` read."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    page_size: int


# A runner gets the op's query and layer pool, its index tensors, the bounds, the layer setting
# and the pool's (k_scale, v_scale) (None for pages in the model's dtype), and returns `[nnz, H_q, D]`
# in q's dtype.
Runner = Callable[
    [torch.Tensor, torch.Tensor, PagedIndex, int, int, LayerParams, tuple[float, float] | None], torch.Tensor
]


class RunnerRegistry:
    """paged_attention's runners by backend name, "torch" built in.

    One per process (`RUNNERS`): the op it serves is process-global too. Registering a name again
    replaces its runner (every FlashInferExecutor registers the same function).
    """

    def __init__(self) -> None:
        self._runners: dict[str, Runner] = {"torch": run_torch}

    def register(self, backend: str, runner: Runner) -> None:
        """Make `paged_attention(..., backend=backend)` call `runner`."""
        self._runners[backend] = runner

    def unregister(self, backend: str) -> None:
        if backend == "torch":
            raise ValueError("the torch runner is built in and cannot be unregistered")
        self._runners.pop(backend, None)

    def __contains__(self, backend: str) -> bool:
        return backend in self._runners

    def get(self, backend: str) -> Runner:
        """The runner of `backend`; ValueError saying what to do when none is registered."""
        runner = self._runners.get(backend)
        if runner is None:
            raise ValueError(
                f"no paged_attention runner for backend {backend!r} (known: {sorted(self._runners)}); "
                "the executor must call hf_paged.attention.ops.RUNNERS.register before its first run"
            )
        return runner


@torch.library.custom_op("hf_paged::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    max_q: int,
    max_kv: int,
    sm_scale: float,
    window_left: int,
    logits_soft_cap: float,
    backend: str,
    alibi_slopes: list[float] | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Paged attention of the new tokens of every row; returns `[nnz, H_q, D]` in q's dtype.

    q:                [nnz, H_q, D] new tokens, rows concatenated (row i: `qo_indptr[i]:qo_indptr[i+1]`).
    kv_pool:          [2, num_pages + 1, page_size, H_kv, D] one layer's pool (key and value planes,
                      NHD); its last page is all zeros (KVPool keeps it so): padded reads of the
                      torch runner point there.
    qo_indptr:        [rows + 1] int32.
    kv_indptr:        [rows + 1] int32, pages of row i are `kv_indices[kv_indptr[i]:kv_indptr[i+1]]`.
    kv_indices:       [>= kv_indptr[-1]] int32 page ids.
    kv_last_page_len: [rows] int32 used slots of each row's last page (0 for an empty row).
    max_q, max_kv:    upper bounds of the new tokens and of the KV length of any row.
    sm_scale, window_left, logits_soft_cap, alibi_slopes: as in LayerParams (-1 / 0.0 / None for none).
    k_scale, v_scale: the layer's scales when `kv_pool` holds fp8 (read = stored * scale); else unused.
    Causal attention is bottom-right aligned: a row's new tokens are the last tokens of its KV.
    """
    runner = RUNNERS.get(backend)
    index = PagedIndex(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, page_size=kv_pool.shape[2])
    slopes = tuple(alibi_slopes) if alibi_slopes else None
    params = LayerParams(q.shape[1], kv_pool.shape[3], q.shape[2], sm_scale, window_left, logits_soft_cap, slopes)
    scales = (k_scale, v_scale) if kv_pool.element_size() == 1 else None
    return runner(q, kv_pool, index, max_q, max_kv, params, scales)


@paged_attention.register_fake
def _(q, kv_pool, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, max_q, max_kv, sm_scale,
      window_left, logits_soft_cap, backend, alibi_slopes=None, k_scale=1.0, v_scale=1.0):
    return q.new_empty(q.shape)


def run_torch(
    q: torch.Tensor, kv_pool: torch.Tensor, index: PagedIndex, max_q: int, max_kv: int, params: LayerParams,
    scales: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The "torch" runner: the plain torch path on index tensors alone (no host sync, shapes from
    the bounds only)."""
    nnz, rows = q.shape[0], index.kv_last_page_len.shape[0]
    kv_slots = masks.kv_gather_slots(index, max_kv, zero_page_id=kv_pool.shape[1] - 1)
    # Some row has fewer than max_q new tokens: scatter into a padded layout.
    q_positions = masks.padded_query_positions(index, max_q, nnz) if nnz != rows * max_q else None
    packed = dense.query_layout(max_q, True, params)
    if params.alibi_slopes:
        mask = masks.alibi_mask(index, max_q, max_kv, params)
    else:
        mask = masks.packed_mask(index, max_q, max_kv, params, packed)
    plan = dense.TorchPlan(kv_slots, mask, q_positions, rows, max_q, max_kv, params, packed=packed)
    return dense.run(q, kv_pool, plan, scales).to(q.dtype)


RUNNERS = RunnerRegistry()


def write_kv_auto(kv_pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`write_kv` for callers that run both eagerly and compiled (PagedCache.update).

    Compiling or exporting, it calls the custom op (dynamo records it, as it must for a mutation of
    the pool); eagerly it runs the same code directly, skipping the op dispatch (tens of µs per call).
    """
    if torch.compiler.is_compiling():
        torch.ops.hf_paged.write_kv(kv_pool, key, value, slot_mapping)
    else:
        write_kv_eager(kv_pool, key, value, slot_mapping)


def write_kv_eager(kv_pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_pool.element_size() == 1 and key.dtype == kv_pool.dtype:  # fp8, quantized by the caller: as bytes
        kv_pool, key, value = as_bytes(kv_pool), as_bytes(key), as_bytes(value)
    if not kv_pool.is_contiguous():  # a layer packed into a wider slice (layout.py)
        page_size = kv_pool.shape[2]
        found = reads.token_rows(kv_pool)
        if found is None:  # index by page
            pages, offsets = slot_mapping // page_size, slot_mapping % page_size
            kv_pool[0][pages, offsets] = key.to(kv_pool.dtype)
            kv_pool[1][pages, offsets] = value.to(kv_pool.dtype)
            return
        tokens, per_page = found
        rows = reads.packed_slots(slot_mapping, page_size, per_page)
        tokens[0].index_copy_(0, rows, key.to(tokens.dtype))
        tokens[1].index_copy_(0, rows, value.to(tokens.dtype))
        return
    flat = kv_pool.view(2, -1, kv_pool.shape[3], kv_pool.shape[4])  # (2, pages * page_size, H, D)
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


@torch.library.custom_op("hf_paged::write_kv", mutates_args=("kv_pool",))
def write_kv(kv_pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new tokens' K/V into their slots of one layer's pool.

    kv_pool:      [2, num_pages + 1, page_size, H_kv, D], written in place.
    key, value:   [nnz, H_kv, D], cast to the pool's dtype (fp8 pages: quantized by the caller, kv_quant.py).
    slot_mapping: [nnz] int64 `page_id * page_size + offset` of each token.
    """
    write_kv_eager(kv_pool, key, value, slot_mapping)


@write_kv.register_fake
def _(kv_pool, key, value, slot_mapping):
    return None
