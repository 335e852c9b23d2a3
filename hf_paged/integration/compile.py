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
from collections.abc import Iterator

import torch

from .. import _compat
from ..attention import ops  # registers torch.ops.hf_paged.*
from ..cache.runtime import CACHE_KWARG, BackRefAttribute, runtime_of
from ..cache.static_decode import DecodeBuffers, StaticDecodeCache
from ..memory.reservations import num_pages_for


class CompiledDecode:
    """The compiled forward of one wrapped model, its decode buffers, and the dispatcher around it.

    Installed as the hooked module's `forward` inside `compiled_decode(...)`. `num_compiled_steps` and
    `num_eager_steps` count the forwards that went each way while installed.

    Concurrent generate() calls: the dispatcher stays installed while any call is inside
    `compiled_decode`, each thread sizes its own steps (`pages_per_row` is per thread), and one
    forward runs at a time through the dispatcher (`KVPool.write_lock`).
    """

    runtime = BackRefAttribute()  # weak: the runtime holds this object

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
            windows = [self.runtime.layer_window(layer) for layer in range(len(pool.specs))]
            static = self.caches[key] = StaticDecodeCache(
                pool.pools, buffers, self.backend, windows, pool.kv_quant, pool.specs[0].dtype
            )
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
    generate(); call it yourself to choose, e.g., `backend="aot_eager"` or another `mode`. Raises
    ValueError, before anything changes, on a model wrapped with `exact=True`.
    """
    runtime = runtime_of(model, "compile_decode(model)")
    if runtime.config.exact:  # PagedConfig refuses compile=True next to exact=True for the same reason
        raise ValueError(
            "expected a model wrapped without exact=True, got compile_decode on one wrapped with it: a compiled "
            "decode step fuses stock's operations, so it cannot compute as stock does; re-wrap with "
            "exact=False (hf_paged.wrap(model, exact=False)) to compile, or run it uncompiled"
        )
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
