"""The cache a compiled decode step sees: fixed-shape metadata buffers over the pools.

`DecodeBuffers` holds a decode step's FlashInfer-format metadata in tensors of fixed shape, updated
in place; `StaticDecodeCache` writes K/V and attends through the custom ops of attention/ops.py on
them, so nothing the compiled code reads changes from step to step except tensor contents
(integration/compile.py explains the design).
"""

import torch
from transformers.cache_utils import Cache

from ..attention import ops  # noqa: F401  (registers torch.ops.hf_paged.*)
from ..attention.metadata import ForwardMetadata
from ..attention.params import LayerParams
from ..memory.kv_quant import KVQuant


class DecodeBuffers:
    """Per-forward metadata of a decode step in fixed-shape buffers, updated in place.

    qo_indptr:        [rows + 1] int32, `arange(rows + 1)` (one new token per row).
    kv_indptr:        [rows + 1] int32.
    kv_indices:       [rows * pages_per_row] int32; entries past `kv_indptr[-1]` are stale, never read.
    kv_last_page_len: [rows] int32.
    slot_mapping:     [rows] int64, where each row's new K/V goes.
    seq_length:       [] int64, the padded length `PagedCache.get_seq_length()` reports.
    """

    def __init__(self, rows: int, pages_per_row: int, page_size: int, zero_page_id: int, device: torch.device):
        self.rows, self.pages_per_row, self.page_size = rows, pages_per_row, page_size
        int32 = dict(dtype=torch.int32, device=device)
        # Normal tensors even inside torch.inference_mode(): the buffers outlive the call that made
        # them and are loaded in place by later calls, inside the block or not (as the pool, pool.py).
        with torch.inference_mode(False):
            self.qo_indptr = torch.arange(rows + 1, **int32)
            self.kv_indptr = torch.zeros(rows + 1, **int32)
            self.kv_indices = torch.full((rows * pages_per_row,), zero_page_id, **int32)
            self.kv_last_page_len = torch.zeros(rows, **int32)
            self.slot_mapping = torch.zeros(rows, dtype=torch.int64, device=device)
            self.seq_length = torch.zeros((), dtype=torch.int64, device=device)
        for buffer in self.tensors():
            torch._dynamo.mark_static_address(buffer)

    @property
    def max_kv(self) -> int:
        return self.pages_per_row * self.page_size

    def tensors(self) -> list[torch.Tensor]:
        return [
            self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_last_page_len, self.slot_mapping, self.seq_length,
        ]

    def fits(self, meta: ForwardMetadata) -> bool:
        """Whether `meta` is a decode step these buffers can hold."""
        return meta.is_decode and meta.num_rows == self.rows and meta.max_kv_len <= self.max_kv

    def load(self, meta: ForwardMetadata, seq_length: int) -> None:
        """Copy a decode step's metadata in (device-to-device, no host sync)."""
        self.kv_indptr.copy_(meta.kv_indptr, non_blocking=True)
        self.kv_indices[: meta.kv_indices.numel()].copy_(meta.kv_indices, non_blocking=True)
        self.kv_last_page_len.copy_(meta.kv_last_page_len, non_blocking=True)
        self.slot_mapping.copy_(meta.slot_mapping, non_blocking=True)
        self.seq_length.fill_(seq_length)


class StaticDecodeCache(Cache):
    """The cache a compiled decode step sees: fixed buffers and the pools, no Python state that changes.

    Only the dispatcher creates it; generate() never sees it. Its methods are what the model and
    hf_paged's attention function call inside the compiled region.
    """

    dense_forward = False  # a compiled step is never dense (PagedCache.dense_forward)

    def __init__(
        self, pools: list[torch.Tensor], buffers: DecodeBuffers, backend: str,
        layer_windows: list[int | None] | None = None, kv_quant: KVQuant | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(layers=[])
        self.pools = pools
        self.dtype = dtype or pools[0].dtype  # the model's (queries'); the pools' with pages in the model's dtype
        self.kv_quant = kv_quant  # fp8 pages: scales (set by the eager prefill) and clamp counts
        self.buffers = buffers
        self.backend = backend
        self.num_layers = len(pools)
        # Each layer's window (None: full), as a list rather than the runtime's method: the runtime
        # holds this cache, and a link back would be a reference cycle (runtime.BackRef).
        self._layer_windows = layer_windows

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, for models that do not pass it to the attention function."""
        return self._layer_windows[layer_idx] if self._layer_windows is not None else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new K/V `[rows, H_kv, 1, D]` into their slots. Returns the inputs unchanged."""
        rows, num_kv_heads, q_len, head_dim = key_states.shape
        key = key_states.transpose(1, 2).reshape(rows * q_len, num_kv_heads, head_dim)
        value = value_states.transpose(1, 2).reshape(rows * q_len, num_kv_heads, head_dim)
        if self.kv_quant is not None:
            key, value = self.kv_quant.quantize(layer_idx, key, value)
        torch.ops.hf_paged.write_kv(self.pools[layer_idx], key, value, self.buffers.slot_mapping)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, params: LayerParams) -> torch.Tensor:
        """Attention of `query [rows, H_q, 1, D]` over the pages; returns `[rows, 1, H_q, D]`."""
        rows, num_heads, q_len, head_dim = query.shape
        b = self.buffers
        q = query.transpose(1, 2).reshape(rows * q_len, num_heads, head_dim)
        out = torch.ops.hf_paged.paged_attention(
            q, self.pools[layer_idx], b.qo_indptr, b.kv_indptr, b.kv_indices, b.kv_last_page_len,
            1, b.max_kv, params.sm_scale, params.window_left, params.logits_soft_cap, self.backend,
            list(params.alibi_slopes) if params.alibi_slopes else None, *self._scales(layer_idx),
        )
        return out.view(rows, q_len, num_heads, head_dim)

    def _scales(self, layer_idx: int) -> tuple[float, float]:
        return self.kv_quant.scales[layer_idx] if self.kv_quant is not None else (1.0, 1.0)

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        return self.buffers.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.buffers.max_kv, 0  # what the attention reads: the capacity (the mask is never built)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.buffers.max_kv

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    def __len__(self) -> int:
        return self.num_layers
