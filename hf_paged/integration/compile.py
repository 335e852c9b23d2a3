"""Compiled decode steps: fixed-shape metadata buffers and a compiled decoder forward.

How it works (`PagedConfig(compile=True)`, or `compile_decode(model, ...)` to pick the backend):

* The compiled region is the forward of the module wrap hooks (`runtime.decoder`, the base model
  or its decoder: embeddings, mask creation, decoder layers, final norm), below the hooks. The
  hooks, page tables, metadata build and copy-on-write page copies stay eager; so does the LM head.
* During a wrapped generate(), that module's `forward` is swapped for a `CompiledDecode` dispatcher
  and restored afterwards. Prefill and any step that is not a plain decode step (one new token
  per row, no padding, `position_ids` given, all layers on one device, within capacity) run the
  original forward eagerly.
* For a decode step the dispatcher copies this step's metadata (FlashInfer's format) into
  persistent buffers of fixed shape, `rows x pages_per_row`, then calls the compiled forward with
  the cache argument a `StaticDecodeCache` over those buffers. That cache writes K/V and attends
  through the custom ops of `attention/ops.py` with the capacity as `max_kv`, reports constant mask
  sizes and its length as a 0-d tensor. Nothing the compiled code reads changes from step to step
  except tensor contents, so a decode step compiles once per (rows, capacity) and never again as
  sequences grow, beam search included (`reorder_cache` only changes the page tables).
* The capacity comes from generate's length limit (`prompt + max_new_tokens`, or `max_length`),
  rounded up to pages and then to a power of two of pages, so calls with nearby lengths share a
  graph. The torch executor attends over the whole capacity (masked), like a static cache.
* One graph per (model class, rows, capacity). Dynamo keeps at most `recompile_limit` (8) per code
  object, and transformers' forward decorators share one code object across models; past the
  limit, decode steps of that shape run eagerly with one warning, and are never tried again.
* CPU: `torch.compile` default mode (inductor). CUDA: `mode="reduce-overhead"` (CUDA graphs); the
  pools and buffers are marked static addresses so replays read them in place. An executor that
  plans outside the graph (FlashInfer's CUDA-graph decode wrapper) does so in its
  `plan_decode(meta, cache)`, called before each compiled step with the buffers already filled,
  and runs inside the op through the runner its `op_runner` names (`ops.RUNNERS`).
"""

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from transformers.cache_utils import Cache

from .. import _compat
from ..attention import ops  # registers torch.ops.hf_paged.*
from ..attention.params import LayerParams
from ..attention.metadata import ForwardMetadata
from ..cache.runtime import CACHE_KWARG, runtime_of
from ..memory.tables import num_pages_for


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

    def __init__(
        self, pools: list[torch.Tensor], buffers: DecodeBuffers, backend: str,
        layer_window: Callable[[int], int | None] | None = None,
    ):
        super().__init__(layers=[])
        self.pools = pools
        self.buffers = buffers
        self.backend = backend
        self.num_layers = len(pools)
        self._layer_window = layer_window

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, for models that do not pass it to the attention function."""
        return self._layer_window(layer_idx) if self._layer_window is not None else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new K/V `[rows, H_kv, 1, D]` into their slots. Returns the inputs unchanged."""
        rows, num_kv_heads, q_len, head_dim = key_states.shape
        key = key_states.transpose(1, 2).reshape(rows * q_len, num_kv_heads, head_dim)
        value = value_states.transpose(1, 2).reshape(rows * q_len, num_kv_heads, head_dim)
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
            list(params.alibi_slopes) if params.alibi_slopes else None,
        )
        return out.view(rows, q_len, num_heads, head_dim)

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


class CompiledDecode:
    """The compiled forward of one wrapped model, its decode buffers, and the dispatcher around it.

    Installed as the hooked module's `forward` inside `compiled_decode(...)`. `num_compiled_steps` and
    `num_eager_steps` count the forwards that went each way while installed.

    Concurrent generate() calls: the dispatcher stays installed while any call is inside
    `compiled_decode`, each thread sizes its own steps (`pages_per_row` is per thread), and one
    forward runs at a time through the dispatcher (`KVPool.write_lock`).
    """

    def __init__(self, model: torch.nn.Module, **compile_options):
        runtime = runtime_of(model, "compile_decode(model)")
        self.runtime = runtime
        self.base = runtime.decoder
        forward = self.base.forward
        self.forward = forward.forward if isinstance(forward, CompiledDecode) else forward
        self.compiled = torch.compile(self.forward, **compile_options)
        self.cache_arg = _compat.cache_arg_name(self.forward)
        self.caches: dict[tuple[int, int], StaticDecodeCache] = {}
        self._per_thread = threading.local()
        self.install_lock = threading.Lock()
        self.num_installed = 0  # calls inside compiled_decode
        self.replaced_forward = None  # the instance-level forward the dispatcher replaced, if any
        self.num_compiled_steps = 0
        self.num_eager_steps = 0
        runner = runtime.executor.op_runner
        self.backend = runner if runner in ops.RUNNERS else "torch"
        if self.backend != runner:
            warnings.warn(
                f"the {runtime.executor.name} executor's paged_attention runner {runner!r} is not registered "
                "(hf_paged.attention.ops.RUNNERS.register); compiled decode steps use the torch executor"
            )
        self.warned_limit = False
        self.eager_shapes: set[tuple[int, int]] = set()  # (rows, pages_per_row) past dynamo's recompile limit
        pools = runtime.pool.pools
        self.device = pools[0].device if len({p.device for p in pools}) == 1 else None
        for pool in pools:
            torch._dynamo.mark_static_address(pool)

    @property
    def pages_per_row(self) -> int | None:
        """Capacity of this thread's current call, in pages per row; None outside a compiled call."""
        return getattr(self._per_thread, "pages_per_row", None)

    @pages_per_row.setter
    def pages_per_row(self, value: int | None) -> None:
        self._per_thread.pages_per_row = value

    def __call__(self, *args, **kwargs):
        """The hooked module's forward: compiled for a decode step that fits, eager otherwise."""
        paged = kwargs.get(CACHE_KWARG)  # this forward's PagedCache, which wrap's pre-hook passes
        arguments = self._arguments(args, kwargs)
        # One forward at a time: steps of one shape share their buffers, and a compiled graph may
        # write the whole pool back (functionalized in-place op), which would undo another call's writes.
        with self.runtime.pool.write_lock:
            static = self._static_cache(paged, arguments) if paged is not None else None
            output = self._run_compiled(paged, static, arguments) if static is not None else None
            if output is None:
                if static is not None and not self.warned_limit:  # past the recompile limit: nothing ran
                    self.warned_limit = True
                    warnings.warn(
                        "torch._dynamo.config.recompile_limit reached (one graph per model class, row count "
                        "and capacity); these decode steps run eagerly. Raise the limit to compile more shapes."
                    )
                self.num_eager_steps += 1
                return self.forward(*args, **kwargs)
        self.num_compiled_steps += 1
        if _compat.output_cache(output) is static:
            _compat.set_output_cache(output, paged)
        return output

    def _run_compiled(self, paged, static: StaticDecodeCache, arguments: dict):
        """Load this step into the buffers and run the compiled forward; None past the recompile limit."""
        meta = paged._state().meta
        static.buffers.load(meta, paged.get_seq_length())
        self.runtime.executor.plan_decode(meta, static)  # host lists in meta; fixed device buffers in static.buffers
        arguments.update(attention_mask=None)  # the pages already encode padding
        for name in _compat.CACHE_ARG_NAMES:
            arguments.pop(name, None)
        arguments[self.cache_arg] = static
        arguments[CACHE_KWARG] = static  # what the attention function attends through
        self.runtime.set_forward_cache(static)  # where the keyword does not reach the attention
        try:
            return self.compiled(**arguments)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before the graph ran: nothing written
            # Never retry this shape: each attempt would print torch's recompile_limit warning again.
            self.eager_shapes.add((meta.num_rows, self.pages_per_row))
            return None
        finally:
            self.runtime.set_forward_cache(paged)

    def _arguments(self, args: tuple, kwargs: dict) -> dict:
        bound = self.runtime.forward_signature.bind_partial(*args, **kwargs).arguments
        for name, parameter in self.runtime.forward_signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                bound.update(bound.pop(name, {}))
        return bound

    def _static_cache(self, paged, arguments: dict) -> StaticDecodeCache | None:
        """The StaticDecodeCache for this forward, or None when it must run eagerly."""
        if self.pages_per_row is None or self.device is None:
            return None
        # Positions come from position_ids (the step drops the mask); a patched family whose forward
        # takes none (ALiBi: Bloom, MPT) needs none, its attention reads positions off the pages.
        no_positions = self.runtime.patch is not None and "position_ids" not in self.runtime.forward_signature.parameters
        if arguments.get("position_ids") is None and not no_positions:
            return None
        meta = paged._state().meta
        if not meta.is_decode or meta.slot_mapping.device != self.device:
            return None
        key = (meta.num_rows, self.pages_per_row)
        if key in self.eager_shapes:
            return None
        static = self.caches.get(key)
        if static is None:
            pool = self.runtime.pool
            buffers = DecodeBuffers(meta.num_rows, self.pages_per_row, pool.page_size, pool.zero_page_id, self.device)
            static = self.caches[key] = StaticDecodeCache(pool.pools, buffers, self.backend, self.runtime.layer_window)
        return static if static.buffers.fits(meta) else None

    def size_for(self, max_tokens: int) -> None:
        """Size the buffers for rows of up to `max_tokens` tokens (a power of two of pages)."""
        self.pages_per_row = capacity_pages(max_tokens, self.runtime.pool.page_size)


def capacity_pages(max_tokens: int, page_size: int) -> int:
    """Pages per row of the decode buffers for rows of up to `max_tokens` tokens: a power of two.

    Together with the row count this is the shape a compiled decode step is compiled for.
    """
    pages = num_pages_for(max(max_tokens, 1), page_size)
    return 1 << (pages - 1).bit_length()


def default_compile_options(model: torch.nn.Module) -> dict:
    """fullgraph, static shapes; CUDA graphs (`mode="reduce-overhead"`) on CUDA, default mode elsewhere."""
    on_cuda = any(pool.device.type == "cuda" for pool in runtime_of(model, "compile_decode(model)").pool.pools)
    return dict(fullgraph=True, dynamic=False, mode="reduce-overhead" if on_cuda else None)


def compile_decode(model: torch.nn.Module, **compile_options) -> CompiledDecode:
    """Set up compiled decode steps for a wrapped model; keyword arguments go to `torch.compile`.

    `PagedConfig(compile=True)` calls this with `default_compile_options(model)` on the first
    generate(); call it yourself to choose, e.g., `backend="aot_eager"` or another `mode`.
    """
    runtime = runtime_of(model, "compile_decode(model)")
    options = {**default_compile_options(model), **compile_options}
    runtime.compiled = CompiledDecode(model, **options)
    return runtime.compiled


@contextlib.contextmanager
def compiled_decode(model: torch.nn.Module, max_tokens: int) -> Iterator[CompiledDecode]:
    """Run the wrapped model's decode steps compiled inside this block (rows of up to `max_tokens`)."""
    runtime = runtime_of(model, "compiled_decode(model)")
    with runtime.lock:
        compiled = runtime.compiled or compile_decode(model)
    base = compiled.base
    previous_pages = compiled.pages_per_row
    compiled.size_for(max_tokens)
    with compiled.install_lock:  # installed by the first call in, removed by the last one out
        if compiled.num_installed == 0:
            compiled.replaced_forward = base.__dict__.get("forward")
            base.forward = compiled
        compiled.num_installed += 1
    try:
        yield compiled
    finally:
        with compiled.install_lock:
            compiled.num_installed -= 1
            if compiled.num_installed == 0:
                if compiled.replaced_forward is None:
                    del base.forward
                else:
                    base.forward = compiled.replaced_forward
        compiled.pages_per_row = previous_pages


def generate_max_tokens(model: torch.nn.Module, inputs, generation_config, kwargs: dict) -> int:
    """An upper bound of the tokens per row a generate() call reaches: prompt + new tokens.

    Sizes the compiled decode buffers and the page reservation of generate(); an overestimate
    costs neither correctness nor memory.
    """
    config = generation_config if generation_config is not None else model.generation_config
    prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else 0
    max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if max_new is None:
        max_new = kwargs.get("max_length", config.max_length) or 0  # an upper bound either way
    return prompt_length + max_new


def maybe_compiled_decode(
    model: torch.nn.Module, inputs, generation_config, kwargs: dict
) -> contextlib.AbstractContextManager:
    """`compiled_decode` sized for this generate() call when `PagedConfig(compile=True)`, else a no-op."""
    if not runtime_of(model, "generate()").config.compile:
        return contextlib.nullcontext()
    return compiled_decode(model, generate_max_tokens(model, inputs, generation_config, kwargs))
