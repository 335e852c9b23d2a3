"""ForwardSteps: what a PagedCache does in each forward, once per forward and once per layer.

`begin_forward` (the decoder's pre-hook) places the forward's new tokens in every group's pages and
builds their metadata; each layer's `update` writes its K/V and `attend` runs the executor on its
pages; `end_forward` (the decoder's forward hook) lets windows go and notes the peaks. The per-layer
calls run on every layer of every token: what does not change within a forward (the metadata, the
plan of a layer setting) or within a cache (each layer's pool, group and planes) is worked out
once, so a decode step's layer does two `index_copy_`, two views and the attention kernel, with as
few Python steps around them as the checks allow (`scripts/bench.py --workload overhead`).

PagedCache (cache.py) mixes this in; the page bookkeeping is GroupPages' (group_pages.py).
"""

from dataclasses import replace

import torch

from ..attention import LayerParams, ops
from ..attention.metadata import ForwardMetadata, advance_metadata, build_metadata
from ..attention.torch import cross as cross_attention
from ..attention.torch import reads
from ..memory.kv_quant import as_bytes
from ..memory.pool import copy_pages
from .runtime import set_stock_masks
from . import inflight
from .dense import needs_dense, padded_kv, plan_dense
from .forward import (
    ForwardState,
    NoGradThroughPages,
    cache_window_params,
    check_compiled_window,
    new_tokens,
)


class ForwardSteps:
    """The forward lifecycle and per-layer calls of PagedCache (see the module docstring)."""

    def _init_steps(self) -> None:
        """Per cache, what every layer call reads: each layer's (pool, group, device), its key and
        value planes as `[slots, H_kv, D]` views (None for a layer packed into a wider slice), and
        its window; whether every layer is on one device."""
        pools = self.pool.pools
        self._layers = [(layer_pool, self.layer_group[layer], layer_pool.device) for layer, layer_pool in enumerate(pools)]
        # fp8 pages: scales and clamp counts (memory/kv_quant.py); None for pages in the model's dtype.
        self._quant = self.pool.kv_quant
        # (heads, head dim, dtype, page size, planes) per layer: what update() checks and writes to
        # (fp8 pages: dtype None, K/V are quantized from the model's dtype, planes are bytes).
        self._writes = [
            (layer_pool.shape[3], layer_pool.shape[4], None if self._quant else layer_pool.dtype, layer_pool.shape[2],
             token_planes(layer_pool))
            for layer_pool in pools
        ]
        self._layer_windows = [self.runtime.layer_window(layer) for layer in range(len(pools))]
        self._one_device = len({layer_pool.device for layer_pool in pools}) <= 1
        self._has_windows = any(group.window is not None for group in self.groups)
        self._forward: ForwardState | None = None
        # Per group, the PageTables.version the last metadata was built at, and that metadata.
        self._built: list[tuple[int, ForwardMetadata | None]] = [(-1, None)] * len(self.groups)
        # (device, layer params, group) -> the page list object and the plan of the last forward that planned it.
        self._last_plans: dict[tuple, tuple[list[int] | None, object]] = {}
        self._layers_checked = False  # every layer's dtype and device checked against the pool (begin_forward)

    def _forget_built(self) -> None:
        """Drop the metadata and plans kept for the next forward (the rows are gone)."""
        self._built = [(-1, None)] * len(self.groups)
        self._last_plans.clear()
        self._layers_checked = False

    def begin_forward(self, batch_size: int, q_len: int, attention_mask: torch.Tensor | None, device: torch.device,
                      output_attentions: bool = False) -> None:
        """Place this forward's new tokens and build its metadata. Called once per forward, before any layer.

        attention_mask: the 2-D padding mask `[batch, past + q_len]` generate() passes (1 = token,
        0 = pad, anywhere), or None. Pad tokens among the new ones are not stored. The forward runs
        dense (dense.py) for `output_attentions` and for padding paged attention cannot express.
        """
        self._check_usable()
        # Every layer at a cache's first forward; then the first layer's, per forward (`model.to()`
        # moves them all; a layer moved alone while a cache is open fails in its own tensor ops).
        if not self.runtime.pool_still_matches(self.pool, first_layer_only=self._layers_checked):
            change = self.runtime.pool_mismatch(self.pool)
            if change is not None:
                raise ValueError(
                    f"the model's dtype or device changed after this PagedCache was created ({change}); "
                    "release() it and create a new PagedCache(model), which gets a pool that matches"
                )
        self._layers_checked = True
        qo_lens, token_index, new_mask = new_tokens(attention_mask, batch_size, q_len, device)
        tables = self.group_tables[0]
        if tables.num_rows == 0 and self.seq_length == 0:
            self.add_rows(batch_size)
            self.reserve_rows()
        if batch_size != tables.num_rows:
            beams = self.returned_num_beams or 1
            hint = (
                f"it was returned by a beam search with num_beams={beams}, and holds every beam of every input "
                f"(as stock's does): continue it with num_beams={beams}, as on stock, or pick rows with "
                "cache.batch_select_indices(idx); " if beams > 1 else ""
            )
            raise ValueError(
                f"this PagedCache holds {tables.num_rows} rows but the forward has batch size {batch_size}; {hint}"
                "use cache.batch_repeat_interleave(n) or batch_select_indices(idx) to change the rows"
            )
        runtime = self.runtime
        dense = runtime.dense_only or output_attentions
        # A mask's holes are looked for only where they can be new: in a forward with pads among its
        # new tokens, or once the rows hold holes (`has_holes`; a decode step's token is never a pad).
        if not dense and attention_mask is not None and not self.ragged_prefill and (new_mask is not None or self.has_holes):
            dense, holes = needs_dense(runtime, self.groups, attention_mask, q_len)
            self.has_holes = self.has_holes or holes
        skips = pasts = None
        with self.pool.blocks.lock:  # other caches share the pool: drop and take at once
            if self._has_windows:
                self._drop_out_of_window()
            if dense:  # where each stored past token goes in stock's padded layout, before placing new ones
                # The last token of a split prompt sees the whole prompt, as in stock's one forward (prompt_phase).
                windows = runtime.cache_windows if self.prompt_phase != "last" else [None] * len(runtime.cache_windows)
                dense = plan_dense(self.group_tables, attention_mask, batch_size, q_len, self.seq_length, device, windows)
            elif self._has_windows:
                # A prompt's sliding layers store only what later queries see (inflight.py).
                skips = inflight.forward_skips(
                    self.groups, self.group_tables, self.applies_window, qo_lens, self.recording,
                    self.prompt_phase is not None,
                )
                pasts = inflight.pasts(self.group_tables, skips)  # what their queries read of the rows' past
            appended = self.pages.place(qo_lens, skips)  # every group's pages, or none (OutOfPagesError)
        metas = []
        for group, (tables, (slots, copies, _)) in enumerate(zip(self.group_tables, appended)):
            version, previous = self._built[group]
            if version == tables.version and token_index is None and previous.device == device:
                meta = advance_metadata(previous, qo_lens, q_len, slots)  # the same pages as the forward before
            else:
                meta = build_metadata(tables, qo_lens, q_len, slots, copies, token_index, device, self.cascade, group)
            self._built[group] = (tables.version, meta)
            metas.append(meta)
        self.seq_length += q_len
        # Metadata built where every layer is (the common case) is read as is; else per device (_meta_on).
        direct = self._one_device and device == self._layers[0][2]
        self._forward = state = ForwardState(metas, prompt_last=self.prompt_phase == "last", direct=direct, dense=dense or None)
        if skips is not None:
            inflight.start(state, skips, [deferred for _, _, deferred in appended], new_mask, qo_lens, q_len, device, pasts)
        for group, meta in enumerate(metas):
            if not direct:
                state.metas[(group, device)] = meta
            if meta.copy_src is not None:  # copy-on-write, every layer of the group, before any layer writes
                with self.pool.write_lock:
                    for layer in self.groups[group].layers:
                        pool, _, layer_device = self._layers[layer]
                        layer_meta = meta if direct else self._meta_on(layer_device, group)
                        copy_pages(pool, layer_meta.copy_src, layer_meta.copy_dst)
        if dense and runtime.patch is None:  # the model builds stock's masks for its stock attention
            state.masks_before = set_stock_masks(runtime.original_attn_implementation)

    def _drop_out_of_window(self) -> None:
        """Windows let go of what the next queries cannot see (not while recording, nor a cache-only
        window while a split prompt is still open)."""
        if not self.recording:
            self.pages.drop_out_of_window(keep_cache_windows=self.prompt_phase is not None)

    def end_forward(self, completed: bool = True) -> None:
        """Close the forward; `completed=False` when it raised (then nothing is checked).

        Windows let go of what the next queries cannot see, and the peaks are noted (as the memory
        stock's window-only cache holds after a forward, which the benchmark compares).
        """
        state, self._forward = self._forward, None
        if state is not None:
            if state.dense is not None and self.runtime.patch is None:
                set_stock_masks(state.masks_before)
            if state.deferred:
                self.pages.release_deferred(state.deferred)
            if state.prompt_last:
                self.prompt_phase = None
            if self._has_windows:
                self._drop_out_of_window()
            self.pages.note_peaks()
        if completed and state is not None and state.dense is None and state.num_written != state.num_attended:
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

    def _meta_on(self, device: torch.device, group: int = 0) -> ForwardMetadata:
        state = self._state()
        if state.direct:
            return state.group_metas[group]
        meta = state.metas.get((group, device))
        if meta is None:
            meta = state.metas[(group, device)] = state.group_metas[group].to(device)
        return meta

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's new K/V `[batch, H_kv, q_len, D]` into layer `layer_idx`'s pages.

        Returns the inputs unchanged: the paged attention function reads the pool itself.
        """
        state = self._forward
        if state is None:
            state = self._state()  # raises
        pool, group, device = self._layers[layer_idx]
        meta = state.group_metas[group] if state.direct else self._meta_on(device, group)
        pool_heads, pool_head_dim, dtype, page_size, planes = self._writes[layer_idx]
        batch, num_heads, q_len, head_dim = key_states.shape
        if num_heads != pool_heads or head_dim != pool_head_dim:
            raise ValueError(
                f"layer {layer_idx} produced K/V with {num_heads} heads of size {head_dim}, but its pool "
                f"holds {(pool_heads, pool_head_dim)}; this model's attention is not supported by hf_paged"
            )
        index = meta.token_index if meta.write_index is None else meta.write_index
        dtype = dtype or key_states.dtype
        if q_len == 1 and index is None:  # decode: dropping the length-1 dim is a view
            key, value = key_states.view(batch, num_heads, head_dim), value_states.view(batch, num_heads, head_dim)
            if key.dtype != dtype:
                key, value = key.to(dtype), value.to(dtype)
        else:
            key, value = pack(key_states, index, dtype), pack(value_states, index, dtype)
        if key.requires_grad or value.requires_grad:  # your own forward in grad mode: pages need no graph
            key, value = key.detach(), value.detach()
            state.graph_kv[layer_idx] = (key_states, value_states)  # attend refuses a backward through them
        quant = self._quant
        if quant is not None:  # fp8 pages: the layer's scales are set by its first write
            if quant.scales[layer_idx] is None:
                quant.set_scales(layer_idx, key, value, self.runtime.attention_modules[layer_idx])
            key, value = quant.quantize(layer_idx, key, value)
        if planes is None or torch.compiler.is_compiling():  # the hf_paged::write_kv op when compiling
            ops.write_kv_auto(pool, key, value, meta.slot_mapping)
        else:  # the same copy on planes viewed once per pool (two tensor calls per layer)
            key_plane, value_plane, per_page = planes
            slots = meta.slot_mapping
            if per_page != page_size:  # a layer packed into a wider slice (layout.py)
                slots = state.packed_slots.get((group, per_page))
                if slots is None:
                    slots = state.packed_slots[(group, per_page)] = reads.packed_slots(meta.slot_mapping, page_size, per_page)
            key_plane.index_copy_(0, slots, as_bytes(key))  # (fp8 pages: planes and K/V as bytes)
            value_plane.index_copy_(0, slots, as_bytes(value))
        state.num_written += 1
        if state.dense is not None:  # stock's view of the cache: every padded position (dense.py)
            return padded_kv(state.dense, layer_idx, group, pool, key_states, value_states, self._quant)
        if meta.write_index is not None:  # this layer attends from these K/V (inflight.py)
            state.stash[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, params: LayerParams) -> torch.Tensor:
        """Paged attention of `query [batch, H_q, q_len, D]` for one layer; returns `[batch, q_len, H_q, D]`."""
        state = self._forward
        if state is None:
            state = self._state()  # raises
        if torch.is_grad_enabled() and (query.requires_grad or state.graph_kv):
            return self._attend_in_grad_mode(state, layer_idx, query, params)
        state.num_attended += 1
        pool, group, device = self._layers[layer_idx]
        if params is state.last_params and group == state.last_group and device == state.last_device:
            plan, meta = state.last_plan, state.last_meta  # the common case: every layer like the one before
        else:
            plan, meta = self._plan_for(state, layer_idx, pool, group, device, params)
            if meta is None:  # a prompt's sliding layer: from the forward's own K/V (inflight.py)
                return inflight.attend(state, layer_idx, group, query, plan, pool, self._quant)
        batch, num_heads, q_len, head_dim = query.shape
        if meta.token_index is None:  # every input token is new: `[nnz, H_q, D]` is a view or a reshape
            q = query.view(batch, num_heads, head_dim) if q_len == 1 else query.transpose(1, 2).reshape(-1, num_heads, head_dim)
            if self._quant is None:
                return self.executor.run(q, pool, plan).view(batch, q_len, num_heads, head_dim)
            return self.executor.run(q, pool, plan, self._quant.scales[layer_idx]).view(batch, q_len, num_heads, head_dim)
        scales = self._quant.scales[layer_idx] if self._quant is not None else None
        out = self.executor.run(pack(query, meta.token_index, query.dtype), pool, plan, scales)  # (nnz, H_q, D)
        full = out.new_zeros(batch * q_len, num_heads, head_dim)
        return full.index_copy_(0, meta.token_index, out).view(batch, q_len, num_heads, head_dim)

    def _attend_in_grad_mode(self, state: ForwardState, layer_idx: int, query: torch.Tensor, params: LayerParams):
        """`attend` in your own forward in grad mode: the same values, computed without a graph (the
        pages hold none), in one that raises a clear error on backward (forward.NoGradThroughPages)."""
        inputs = (query, *state.graph_kv.pop(layer_idx, ()))
        with torch.no_grad():
            out = self.attend(layer_idx, query.detach(), params)
        return NoGradThroughPages.apply(out, *inputs)

    def _plan_for(self, state: ForwardState, layer_idx: int, pool: torch.Tensor, group: int, device: torch.device,
                  params: LayerParams):
        """The plan and metadata of a layer whose setting, group or device differs from the layer
        before it (planned once per forward, setting, group and device); for a group attending
        from the forward's own K/V (inflight.py), the settings it attends with and None."""
        window = self.groups[group].window
        meta = self._meta_on(device, group)
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
        key = (device, params, group)
        plan = state.plans.get(key)
        if plan is None:
            # A decode step on the pages of the forward before (advance_metadata kept its page lists):
            # that forward's plan, moved on by a token, where the executor can.
            last = self._last_plans.get(key)
            if last is not None and last[0] is meta.kv_indices_host and meta.kv_indices_host is not None:
                plan = self.executor.advance_plan(last[1], meta)
            if plan is None:
                plan = self.executor.plan(meta, params, self.pool)
                if params.position_bias:
                    plan = self._with_position_bias(plan, meta)
            state.plans[key] = plan
            self._last_plans[key] = (meta.kv_indices_host, plan)
        if not (window is None and self.runtime.config.compile):  # (that check reads the layer's own window)
            state.last_params, state.last_group, state.last_device = layer_params, group, device
            state.last_plan, state.last_meta = plan, meta
        return plan, meta

    def _with_position_bias(self, plan, meta: ForwardMetadata):
        """`plan` with T5's relative position bias in its mask, as stock's SDPA gets it: the bias of
        query row i and key column j of the right-aligned layout (stock's positions q_total - max_q + i
        and kv_total - max_kv + j: the bias depends on their difference only), where the plan's mask
        attends, the lowest float elsewhere."""
        max_q, max_kv = plan.max_q, plan.max_kv
        bias = self.runtime.position_bias.compute_bias(max_q, max_kv, device=meta.device, past_seen_tokens=max_kv - max_q)
        return replace(plan, mask=cross_attention.float_mask(plan.mask, bias, bias.dtype))


def pack(states: torch.Tensor, token_index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`[batch, H, q_len, D]` -> `[nnz, H, D]`: the new tokens only, in row order."""
    batch, heads, q_len, head_dim = states.shape
    if q_len == 1 and token_index is None:  # decode: dropping the length-1 dim is a view (one call, not three)
        flat = states.view(batch, heads, head_dim)
    else:
        flat = states.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        if token_index is not None:
            flat = flat.index_select(0, token_index)
    return flat if flat.dtype == dtype else flat.to(dtype)


def token_planes(layer_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The key and value planes of a layer pool `[2, pages, page_size, H_kv, D]` as `[rows, H_kv, D]`
    views, and the rows from one page to the next (`reads.token_rows`: page_size for a contiguous
    pool, where a row is a `slot_mapping` slot; the slice's page stride for a layer packed into a
    wider slice, layout.py); None for a layout they cannot view, which ops.write_kv_eager writes by page."""
    found = reads.token_rows(as_bytes(layer_pool))
    if found is None:
        return None
    rows, per_page = found
    return rows[0], rows[1], per_page
