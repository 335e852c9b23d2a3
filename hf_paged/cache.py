"""PagedCache: the transformers `Cache` that generate() drives, backed by a KVPool."""

import weakref

import torch
from transformers.cache_utils import Cache

from . import _compat, inflight
from .attention import Executor, LayerParams, ops
from .forward import ForwardState, cache_window_params, check_compiled_window, new_tokens
from .group_pages import GroupPages
from .groups import GroupSpec, group_of_layer
from .metadata import ForwardMetadata, build_metadata
from .pool import copy_pages
from .runtime import Runtime, runtime_of
from .tables import PageTables


class PagedCache(Cache):
    """A paged KV cache: rows hold page tables into the model's pool; pages are shared by reference.

    Pass it as `past_key_values=` to a wrapped model's forward or generate(), or let the wrapped
    generate() create one. Pad tokens are never stored, but `get_seq_length()` reports the padded
    length transformers expects. Call `release()` (or use it as a context manager) to give its
    pages back; generate() does so for the caches it creates.

    `max_tokens_per_row` (optional, the prompt plus the new tokens): on an executor that
    `reads_in_place` (the torch executor), the
    rows of the first forward then reserve consecutive pages (PageTables.reserve), so that while
    they share nothing their K/V are read in place instead of gathered. Rows that outgrow it, or
    a pool without such a free run, only lose that shortcut.
    """

    def __init__(self, model: torch.nn.Module, *, max_tokens_per_row: int | None = None):
        super().__init__(layers=[])
        self.runtime: Runtime = runtime_of(model, "PagedCache(model)")
        # A pool that no longer matches the model (model.to(dtype), ...) is replaced here.
        self.executor: Executor
        pool, self.executor = self.runtime.open_pool(self)
        cascade = self.runtime.config.cascade
        self.pool = pool
        self.groups: list[GroupSpec] = self.runtime.groups
        # Page bookkeeping per group of layers, and the peaks (group_pages.py).
        self.pages = GroupPages(pool.blocks, self.groups, [pool.layer_bytes(group.layers) for group in self.groups])
        self.group_tables: list[PageTables] = self.pages.group_tables
        # A cache dropped without release() gives its pages back once collected (KVPool.cache_dropped).
        self._finalizer = weakref.finalize(self, pool.cache_dropped, self.group_tables)
        self.layer_group = group_of_layer(self.groups, pool.num_layers)
        modules = self.runtime.attention_modules
        self.applies_window = [
            group.window is not None and all(inflight.applies_window(modules[layer], group.window) for layer in group.layers)
            for group in self.groups
        ]
        # Per pool, not per layer and token: each layer's key and value planes as `[slots, H_kv, D]`
        # views (where update() writes), and whether every layer is on one device (then a group's
        # metadata is the one begin_forward built, found without a device lookup).
        self._layer_planes = [_token_planes(layer_pool) for layer_pool in pool.pools]
        self._one_device = len({layer_pool.device for layer_pool in pool.pools}) <= 1
        # activate_past_recording() (assisted decoding crops): windows then release nothing.
        self.recording = False
        # Stock prefills the whole prompt in one forward; generate.prefill_prompt and
        # prefill.prefill_with_prefix_cache run it minus its last token ("prefill"), and generate()
        # then feeds that token ("last", until that forward ends). Groups whose window is only the
        # cache's (GroupSpec.cache_window) keep the whole prompt until then: in stock, the last
        # prompt token's query sees all of it.
        self.prompt_phase: str | None = None
        # prefill.prefill_with_prefix_cache: rows continue from different cached lengths, so its one
        # forward's mask has pads between a row's past and its new tokens, by construction.
        self.ragged_prefill = False
        self.seq_length = 0
        self.is_released = False
        # Shared-prefix attention (PagedConfig.cascade): the metadata keeps the host page lists for it.
        self.cascade = self.executor.cascade_by_default if cascade is None else cascade
        self._forward: ForwardState | None = None
        self.max_tokens_per_row = max_tokens_per_row if self.executor.reads_in_place else None

    # -- forward lifecycle -------------------------------------------------------------------

    def begin_forward(self, batch_size: int, q_len: int, attention_mask: torch.Tensor | None, device: torch.device) -> None:
        """Place this forward's new tokens and build its metadata. Called once per forward, before any layer.

        attention_mask: the 2-D padding mask `[batch, past + q_len]` generate() passes (1 = token,
        0 = pad), or None. Pad tokens among the new ones are not stored.
        """
        self._check_usable()
        change = None if self.runtime.pool_still_matches(self.pool) else self.runtime.pool_mismatch(self.pool)
        if change is not None:
            raise ValueError(
                f"the model's dtype or device changed after this PagedCache was created ({change}); "
                "release() it and create a new PagedCache(model), which gets a pool that matches"
            )
        # Pad tokens among the new ones are not stored.
        qo_lens, token_index, new_mask = new_tokens(attention_mask, batch_size, q_len, device, self.ragged_prefill)
        if self.tables.num_rows == 0 and self.seq_length == 0:
            self.add_rows(batch_size)
            self.reserve_rows()
        if batch_size != self.tables.num_rows:
            raise ValueError(
                f"this PagedCache holds {self.tables.num_rows} rows but the forward has batch size {batch_size}; "
                "use cache.batch_repeat_interleave(n) or batch_select_indices(idx) to change the rows"
            )
        with self.pool.blocks.lock:  # other caches share the pool: drop and take at once
            self._drop_out_of_window()
            # A prompt's sliding layers store only what later queries see (inflight.py).
            skips = inflight.forward_skips(
                self.groups, self.group_tables, self.applies_window, qo_lens, self.recording, self.prompt_phase is not None
            )
            pasts = inflight.pasts(self.group_tables, skips)  # what their queries read of the rows' past
            appended = self.pages.place(qo_lens, skips)  # every group's pages, or none (OutOfPagesError)
        metas = [
            build_metadata(tables, qo_lens, q_len, slots, copies, token_index, device, self.cascade, group)
            for group, (tables, (slots, copies, _)) in enumerate(zip(self.group_tables, appended))
        ]
        self.seq_length += q_len
        self._forward = state = ForwardState(metas, prompt_last=self.prompt_phase == "last")
        inflight.start(state, skips, [deferred for _, _, deferred in appended], new_mask, qo_lens, q_len, device, pasts)
        for group, meta in enumerate(metas):
            self._forward.metas[(group, meta.slot_mapping.device)] = meta
            if meta.copy_src is not None:  # copy-on-write, every layer of the group, before any layer writes
                with self.pool.write_lock:
                    for layer in self.groups[group].layers:
                        pool = self.pool.pools[layer]
                        layer_meta = self._meta_on(pool.device, group)
                        copy_pages(pool, layer_meta.copy_src, layer_meta.copy_dst)

    def _drop_out_of_window(self) -> None:
        """Windows let go of what the next queries cannot see (not while recording, nor a cache-only
        window while a split prompt is still open)."""
        if not self.recording:
            self.pages.drop_out_of_window(keep_cache_windows=self.prompt_phase is not None)

    def reserve_rows(self) -> None:
        """With `max_tokens_per_row`, give the (empty) rows runs of consecutive pages in every full group."""
        self.pages.reserve_rows(self.max_tokens_per_row)

    def add_rows(self, num_rows: int) -> None:
        """Append `num_rows` empty rows to every group's tables."""
        self.pages.add_rows(num_rows)

    def adopt(self, row: int, group_pages: list[list[int]], num_tokens: int) -> None:
        """Start the empty row `row` with shared full pages, `group_pages[g]` in group g."""
        self.pages.adopt(row, group_pages, num_tokens)

    def extend(self, row: int, group_pages: list[list[int]], num_tokens: int) -> None:
        """Append shared full pages to row `row`, which holds only full pages: `group_pages[g]` in group g."""
        self.pages.adopt(row, group_pages, num_tokens, extend=True)

    def end_forward(self, completed: bool = True) -> None:
        """Close the forward; `completed=False` when it raised (then nothing is checked).

        Windows let go of what the next queries cannot see, and the peaks are noted (as the memory
        stock's window-only cache holds after a forward, which the benchmark compares).
        """
        state, self._forward = self._forward, None
        if state is not None:
            self.pages.release_deferred(state.deferred)
            if state.prompt_last:
                self.prompt_phase = None
            self._drop_out_of_window()
            self.pages.note_peaks()
        if completed and state is not None and state.num_written != state.num_attended:
            raise RuntimeError(
                f"{state.num_written} layers wrote K/V to this PagedCache but {state.num_attended} attended "
                "through it: this model does not pass keyword arguments down to its attention function, "
                "which hf_paged needs; please report the model class to hf_paged"
            )

    def _state(self) -> ForwardState:
        if self._forward is None:
            raise RuntimeError(
                "PagedCache.update was called outside a forward of a wrapped model; "
                f"call hf_paged.wrap(model) first and pass the cache as {self._cache_kwarg()}="
            )
        return self._forward

    def _cache_kwarg(self) -> str:
        """The keyword the installed transformers release takes the cache under (for messages)."""
        return _compat.model_cache_arg(self.runtime.decoder)

    def _meta_on(self, device: torch.device, group: int = 0) -> ForwardMetadata:
        state = self._state()
        meta = state.metas.get((group, device))
        if meta is None:
            meta = state.metas[(group, device)] = state.group_metas[group].to(device)
        return meta

    # -- the Cache interface -----------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's new K/V `[batch, H_kv, q_len, D]` into layer `layer_idx`'s pages.

        Returns the inputs unchanged: the paged attention function reads the pool itself.
        Runs per layer and token: what does not change within a forward or a pool is worked out
        once (begin_forward, `_layer_planes`), not here.
        """
        state = self._state()
        pool = self.pool.pools[layer_idx]
        group = self.layer_group[layer_idx]
        meta = state.group_metas[group] if self._one_device else self._meta_on(pool.device, group)
        shape = key_states.shape
        if shape[1] != pool.shape[3] or shape[3] != pool.shape[4]:
            raise ValueError(
                f"layer {layer_idx} produced K/V with {shape[1]} heads of size {shape[3]}, but its pool "
                f"holds {tuple(pool.shape[-2:])}; this model's attention is not supported by hf_paged"
            )
        index = meta.token_index if meta.write_index is None else meta.write_index
        key, value = _pack(key_states, index, pool.dtype), _pack(value_states, index, pool.dtype)
        planes = self._layer_planes[layer_idx]
        if planes is None or torch.compiler.is_compiling():  # the hf_paged::write_kv op when compiling
            ops.write_kv_auto(pool, key, value, meta.slot_mapping)
        else:  # the same copy on planes viewed once per pool (two tensor calls per layer)
            planes[0].index_copy_(0, meta.slot_mapping, key)
            planes[1].index_copy_(0, meta.slot_mapping, value)
        state.num_written += 1
        if meta.write_index is not None:  # this layer attends from these K/V (inflight.py)
            state.stash[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, params: LayerParams) -> torch.Tensor:
        """Paged attention of `query [batch, H_q, q_len, D]` for one layer; returns `[batch, q_len, H_q, D]`."""
        state = self._state()
        state.num_attended += 1
        pool = self.pool.pools[layer_idx]
        group = self.layer_group[layer_idx]
        if params is state.last_params and group == state.last_group and pool.device == state.last_device:
            plan, meta = state.last_plan, state.last_meta  # the common case: every layer like the one before
        else:
            plan, meta = self._plan_for(state, layer_idx, pool, group, params)
            if meta is None:  # a prompt's sliding layer: from the forward's own K/V (inflight.py)
                return inflight.attend(state, layer_idx, group, query, plan, pool)
        batch, num_heads, q_len, head_dim = query.shape
        q = _pack(query, meta.token_index, query.dtype)
        out = self.executor.run(q, pool, plan)  # (nnz, H_q, D)
        if meta.token_index is None:
            return out.view(batch, q_len, num_heads, head_dim)
        full = out.new_zeros(batch * q_len, num_heads, head_dim)
        return full.index_copy_(0, meta.token_index, out).view(batch, q_len, num_heads, head_dim)

    def _plan_for(self, state: ForwardState, layer_idx: int, pool: torch.Tensor, group: int, params: LayerParams):
        """The plan and metadata of a layer whose setting, group or device differs from the layer
        before it (planned once per forward, setting, group and device); for a group attending
        from the forward's own K/V (inflight.py), the settings it attends with and None."""
        window = self.groups[group].window
        meta = self._meta_on(pool.device, group)
        layer_params = params
        if window is not None and not 0 <= params.window_left < window:
            effective = state.window_params.get((group, params))
            if effective is None:
                effective = cache_window_params(self, group, layer_idx, params, meta)
                state.window_params[(group, params)] = effective
            params = effective
        elif window is None and self.runtime.config.compile:
            check_compiled_window(self.runtime, layer_idx, params)
        if group in state.inflight:  # attends from the forward's own K/V: the caller runs inflight.attend
            return params, None
        key = (pool.device, params, group)
        plan = state.plans.get(key)
        if plan is None:
            plan = state.plans[key] = self.executor.plan(meta, params, self.pool)
        if not (window is None and self.runtime.config.compile):  # (that check reads the layer's own window)
            state.last_params, state.last_group, state.last_device = layer_params, group, pool.device
            state.last_plan, state.last_meta = plan, meta
        return plan, meta

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, for models that do not pass it to the attention function."""
        return self.runtime.layer_window(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens per row before the current forward (pads included), as transformers expects."""
        if self._forward is not None:  # begin_forward has already placed this forward's tokens
            return self.seq_length - self._forward.meta.q_len
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: rows take the page tables of `beam_idx`. Moves no K/V."""
        self._check_usable()
        self._select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._check_usable()
        self._select_rows([row for row in range(self.tables.num_rows) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_usable()
        self._select_rows(torch.as_tensor(indices).tolist())

    @property
    def tables(self) -> PageTables:
        """The first group's page tables (row count, tokens per row: the same in every group)."""
        return self.group_tables[0]

    def _select_rows(self, row_ids: list[int]) -> None:
        self.pages.select_rows(row_ids)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens of every row (`tokens_to_remove <= 0`, as stock).

        Pages past the new end go back to the pool (shared ones lose a reference); a shared page
        that becomes the partly filled last page is copied on the next write.
        """
        self._check_usable()
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes the number of tokens to remove as a negative int (as DynamicCache), got {tokens_to_remove}"
            )
        num_remove = min(-tokens_to_remove, self.seq_length)
        if num_remove == 0:
            return
        self.pages.crop(num_remove)  # checks every group before any changes
        self.seq_length -= num_remove

    def reset(self) -> None:
        self.pages.release()
        self.seq_length = 0

    def release(self) -> None:
        """Give every page back to the pool. The cache cannot be used afterwards."""
        if self._forward is not None:
            self.pages.release_deferred(self._forward.deferred)
        self.pages.release()
        self.seq_length = 0
        self._forward = None
        self.is_released = True
        self._finalizer.detach()
        self.pool.close_cache(self)

    def _check_usable(self) -> None:
        if self.is_released:
            raise RuntimeError(
                "this PagedCache was released (generate() releases the caches it creates when it returns); "
                f"create your own PagedCache(model), pass it as {self._cache_kwarg()}= and release() it when done"
            )

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """Keep every page from now on (assisted decoding crops back): windows release nothing.

        `recurrent_states_to_keep` (passed from transformers 5.25 on) sizes the state history of
        linear-attention layers, which a PagedCache never holds (wrap() refuses such models); K/V
        pages are kept whole until `crop`, whatever it says.
        """
        self.recording = True

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        """As stock: only a layer that drops tokens (a sliding window) records, once activated."""
        return self.recording and self.layer_window(layer_idx) is not None

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """No layer keeps recurrent states (stock's default reads `self.layers`, which is empty here)."""
        return 0

    def __enter__(self) -> "PagedCache":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __len__(self) -> int:
        return self.pool.num_layers

    @property
    def peak_kv_bytes(self) -> int:
        return self.pages.peak_kv_bytes

    @property
    def peak_group_pages(self) -> list[int]:
        return self.pages.peak_group_pages

    @property
    def batch_size(self) -> int:
        return self.tables.num_rows

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return self.tables.num_rows > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.pool.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.pool.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.pool.num_layers

    def __repr__(self) -> str:
        return (
            f"PagedCache(rows={self.tables.num_rows}, seq_length={self.seq_length}, "
            f"pages_in_use={self.pool.blocks.num_used_pages}/{self.pool.num_pages})"
        )


def _pack(states: torch.Tensor, token_index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`[batch, H, q_len, D]` -> `[nnz, H, D]`: the new tokens only, in row order."""
    batch, heads, q_len, head_dim = states.shape
    if q_len == 1 and token_index is None:  # decode: dropping the length-1 dim is a view (one call, not three)
        flat = states.view(batch, heads, head_dim)
    else:
        flat = states.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        if token_index is not None:
            flat = flat.index_select(0, token_index)
    return flat if flat.dtype == dtype else flat.to(dtype)


def _token_planes(layer_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The key and value planes of a contiguous layer pool `[2, pages, page_size, H_kv, D]` as
    `[slots, H_kv, D]` views (slot = page * page_size + offset, as `slot_mapping` counts); None for
    a layer packed into a wider slice (layout.py), which ops.write_kv_eager writes by page."""
    if not layer_pool.is_contiguous():
        return None
    flat = layer_pool.view(2, -1, layer_pool.shape[3], layer_pool.shape[4])
    return flat[0], flat[1]
