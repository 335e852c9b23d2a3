"""Cross-attention pages of an encoder-decoder model: computed once per input, read by all its rows.

Stock's generate() repeats the encoder output once per beam (or sample, or return sequence), so
every row computes and stores its own copy of every decoder layer's cross-attention K/V, and beam
search `index_select`s it at every step. Here the first decoder forward writes each input's K/V
once into pages of the cross group (memory/groups.py, `GroupSpec.cross`): one page table per
input, never reordered or copied. Each decoder row reads the pages of its input (`row_input`, which
follows the rows through reorder_cache and the like); they go back to the pool when the call ends.

`CrossPages` is the `cross_attention_cache` of a `PagedEncoderDecoderCache`, the
EncoderDecoderCache that generate() drives; the self-attention cache is a PagedCache.
"""

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache

from ..attention.torch import cross as cross_attention
from ..attention.torch.reads import gather_kv
from ..memory.kv_quant import dequantize
from ..errors import OutOfPagesError
from ..memory.reservations import consecutive_run
from ..memory.tables import PageTables


class _LayerStub:
    """What a cross-attention module reads back after the first step (`cache.layers[i].keys`): no
    K/V (the attention function reads the pages), only the source length in the shape (T5's bias)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: torch.Tensor):
        self.keys = self.values = keys


class CrossPages(Cache):
    """One cache's cross-attention pages: one page table per input (see the module docstring)."""

    def __init__(self, pool, group, num_layers: int):
        super().__init__(layers=[])
        self.pool = pool
        self.first_layer = group.layers[0]  # pool layer of decoder layer 0's cross-attention
        self.num_cross_layers = num_layers
        self.tables = PageTables(pool.blocks, group.page_size)
        self.starts: torch.Tensor | None = None  # the first row of each input (None: every row is one)
        self.prepared = False
        self.row_input: torch.Tensor | None = None  # [rows] int64: each decoder row's input
        self.width = 0  # columns of the padded encoder output (stock's key length)
        self.slots: torch.Tensor | None = None  # [inputs, width] (cross_attention.input_slots)
        self.write_slots: torch.Tensor | None = None  # [source tokens] where update() writes them
        self.token_index: torch.Tensor | None = None  # their positions in `inputs * width`; None: all
        self.mask: torch.Tensor | None = None  # [inputs, width] bool, None when no input is padded
        self._reads: dict = {}  # (rows version, device, q_len) -> what the layers read (_plan_reads)
        self.head_major = False  # how the inputs' pages hold K/V (prepare)
        self.lengths: list[int] = []
        self.offsets: list[int] = []
        self._version = 0

    # --- the call's first decoder forward -------------------------------------------------------
    def prepare(self, states: torch.Tensor, mask: torch.Tensor | None, shared_with: list) -> None:
        """Take pages for every input's source tokens (before any layer writes): `states` is the
        encoder output the decoder got `[rows, width, d]`, `mask` its `[rows, width]` padding
        mask or None. Consecutive equal rows (generate()'s copies per beam or sample) are one input."""
        rows, width = states.shape[:2]
        # Consecutive equal rows are one input (generate() repeat_interleaves the encoder output).
        differs = (states[1:] != states[:-1]).flatten(1).any(dim=1)
        if mask is not None:
            differs |= (mask[1:] != mask[:-1]).any(dim=1)
        starts = torch.cat([differs.new_ones(1), differs]).nonzero().squeeze(1)
        self.row_input = torch.cumsum(torch.cat([differs.new_ones(1), differs]).long(), 0) - 1
        self.starts = None if starts.numel() == rows else starts
        source = mask.bool() if mask is not None else None
        if source is not None and self.starts is not None:
            source = source.index_select(0, self.starts)
        inputs = starts.numel()
        if source is None or bool(source.all()):
            lengths, offsets, source = [width] * inputs, [0] * inputs, None
        else:
            lengths, offsets = _runs(source)
        if width == 0 or 0 in lengths:
            raise ValueError(
                "an encoder-decoder generate() got an empty source (no token, or a row of its attention_mask "
                "all zeros); give every input at least one token"
            )
        with self.pool.blocks.lock:
            self.tables.add_rows(inputs)
            # Inputs back to back in consecutive pages where the pool has such a run: unpadded sources
            # are then read in place (`_plan_reads`), not gathered.
            self.tables.reserve(max(lengths), highest=True)
            try:
                slots, _ = self.tables.append(lengths)
            except OutOfPagesError:
                self.tables.release()
                raise
            for row in range(inputs):  # a shorter input's unused reserved pages go back
                self.tables._end_reservation(row)
        page_size = self.tables.page_size
        self.width = width
        self.mask = source
        self.lengths, self.offsets = lengths, offsets
        pools = self.pool.pools[self.first_layer:]
        tables = self.tables.page_tables
        # Every input in a run of consecutive pages of contiguous layer pools of one shape: each input's
        # K/V are laid out head-major there (cross_attention.write_head_major), read without a transpose.
        self.head_major = all(p.is_contiguous() and p.shape == pools[0].shape for p in pools) and all(
            table == list(range(table[0], table[0] + len(table))) for table in tables
        )
        if self.head_major:
            heads = pools[0].shape[3]
            self.slots = cross_attention.head_major_index(
                tables, lengths, offsets, width, page_size, heads, self.pool.zero_page_id * page_size * heads
            ).to(states.device)
        else:
            self.slots = cross_attention.input_slots(
                tables, lengths, offsets, width, page_size, self.pool.zero_page_id * page_size
            ).to(states.device)
        self.write_slots = torch.tensor(slots, dtype=torch.int64, device=states.device)
        self.token_index = None if source is None else source.reshape(-1).nonzero().squeeze(1).to(states.device)
        self.layers = [_LayerStub(states.new_empty((1, 1, width, 0)))] * self.num_cross_layers
        self.prepared = True
        for pages in shared_with:
            pages.note_cross_pages()

    def input_states(self, states: torch.Tensor) -> torch.Tensor:
        """One row per input of the encoder output the decoder got (its cross-attention
        projections then run once per input, not once per row)."""
        if self.starts is None or states.shape[0] != self.row_input.shape[0]:
            return states
        return states.index_select(0, self.starts)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write decoder layer `layer_idx`'s cross-attention K/V `[inputs or rows, H, width, D]` once."""
        if not self.prepared:
            raise RuntimeError("cross-attention K/V arrived before the decoder forward placed them; call the "
                               "wrapped model's decoder with encoder_hidden_states")
        keys, values = self.input_states(key_states), self.input_states(value_states)
        pool = self.pool.pools[self.first_layer + layer_idx]
        if self.pool.kv_quant is not None:  # fp8 pages (memory/kv_quant.py)
            keys, values = self._quantized(layer_idx, keys, values)
        if self.head_major:
            with self.pool.write_lock:
                cross_attention.write_head_major(
                    pool, keys.to(pool.dtype), values.to(pool.dtype), self.tables.page_tables, self.lengths, self.offsets
                )
            return key_states, value_states
        inputs, heads, width, dim = keys.shape
        flat_k = keys.transpose(1, 2).reshape(inputs * width, heads, dim)
        flat_v = values.transpose(1, 2).reshape(inputs * width, heads, dim)
        if self.token_index is not None:
            flat_k, flat_v = flat_k.index_select(0, self.token_index), flat_v.index_select(0, self.token_index)
        from ..attention import ops  # (the op module imports the executors)

        with self.pool.write_lock:
            ops.write_kv_auto(pool, flat_k.to(pool.dtype), flat_v.to(pool.dtype), self.write_slots)
        return key_states, value_states

    # --- every decoder forward -----------------------------------------------------------------
    def attend(self, layer_idx: int, query: torch.Tensor, params, position_bias: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention of `query [rows, H_q, q_len, D]`; returns `[rows, q_len, H_q, D]`.

        Each input's K/V is read once per layer (in place where it can be) and attended by all of its
        rows (rows of an input stay together in generate()); else every row gathers its own."""
        pool = self.pool.pools[self.first_layer + layer_idx]
        q_len = query.shape[2]
        read = self._reads.get((self._version, query.device, q_len))
        if read is None:
            read = self._plan_reads(query.device, q_len)
        runs, source, count, masks, biased = read
        if position_bias is not None:  # T5: stock adds a (zero) bias to its cross-attention scores
            if biased.get("bias") is not position_bias:
                biased["bias"] = position_bias
                biased["masks"] = [cross_attention.float_mask(mask, position_bias, query.dtype) for mask in masks]
            masks = biased["masks"]
        k, v = self._read(pool, source, count)
        quant = self.pool.kv_quant
        if quant is not None:  # fp8 pages: what this layer reads, dequantized
            k_scale, v_scale = quant.scales[self.first_layer + layer_idx]
            k, v = dequantize(k, query.dtype, k_scale), dequantize(v, query.dtype, v_scale)
        if runs is None:
            return cross_attention.attend_rows(query, k, v, masks[0], params)
        return cross_attention.attend_inputs(query, k, v, runs, masks, params)

    def _quantized(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`keys`, `values` `[inputs, H, width, D]` in the pages' fp8 under the layer's scales, which
        its first write sets from the source tokens (pads left out)."""
        quant, layer = self.pool.kv_quant, self.first_layer + layer_idx
        if quant.scales[layer] is None:
            real_k, real_v = keys, values
            if self.token_index is not None:
                inputs, heads, width, dim = keys.shape
                real_k, real_v = (x.transpose(1, 2).reshape(inputs * width, heads, dim).index_select(0, self.token_index)
                                  for x in (keys, values))
            quant.set_scales(layer, real_k, real_v)
        return quant.quantize(layer, keys, values)

    def _read(self, pool: torch.Tensor, source, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V `[count, H, width, D]` of one layer: a view (a run of pages), a head-major gather, or a
        gather of slots (made contiguous where rows of one input read it)."""
        if isinstance(source, tuple):
            return cross_attention.view_head_major(pool, source, count, self.width)
        if self.head_major:
            return cross_attention.gather_head_major(pool, source)
        k, v = gather_kv(pool, source, count, self.width)
        return k.contiguous(), v.contiguous()

    def _plan_reads(self, device: torch.device, q_len: int):
        """What every cross-attention layer of a forward reads, and each run's mask."""
        self._reads.clear()
        zero, page_size = self.pool.zero_page_id, self.tables.page_size
        inputs = self.tables.num_rows
        row_input = self.row_input.tolist()
        runs = cross_attention.row_runs(row_input)
        in_place = None
        if self.head_major and self.mask is None:  # unpadded inputs of one length back to back: views
            in_place = consecutive_run(self.tables.page_tables, zero)
        if in_place is not None and row_input == list(range(inputs)):  # one row per input, in order
            runs, source, count, masks = None, in_place, inputs, [None]
        elif runs is None:  # rows of one input apart: every row gathers its own
            count = len(row_input)
            if self.head_major:
                source = self.slots.index_select(0, self.row_input)
            else:
                source = cross_attention.row_slots(self.slots, self.row_input, zero, page_size)
            mask = None if self.mask is None else self.mask.index_select(0, self.row_input)[:, None, None, :]
            masks = [None if mask is None else mask.expand(-1, 1, q_len, -1)]
        else:
            count = inputs
            if in_place is not None:
                source = in_place
            elif self.head_major:
                source = self.slots
            else:
                source = cross_attention.row_slots(self.slots, None, zero, page_size)
            masks = [
                None if self.mask is None else self.mask[index][None, None, None, :].expand(end - start, 1, q_len, -1)
                for index, start, end in runs
            ]
        read = self._reads[(self._version, device, q_len)] = (runs, source, count, masks, {})
        return read

    def select_rows(self, row_ids: list[int]) -> None:
        """The decoder rows became `row_ids` of the old ones (beam reorder, fork, selection)."""
        if self.row_input is not None:
            self.row_input = self.row_input[torch.as_tensor(row_ids, device=self.row_input.device)]
            self._version += 1

    def release(self) -> None:
        self.tables.release()
        self.prepared = False
        self.row_input = self.slots = self.write_slots = self.token_index = self.mask = None
        self.layers = []
        self._reads.clear()

    # --- the Cache API EncoderDecoderCache reads ------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width if self.prepared else 0

    def __len__(self) -> int:
        return self.num_cross_layers

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Nothing moves: the self-attention PagedCache reorders the rows, and with them `row_input`."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        """As reorder_cache."""

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """As reorder_cache."""

    def crop(self, tokens_to_remove: int) -> None:
        """Cross-attention K/V depend on the source only: cropping the decoder's tokens keeps them."""

    def reset(self) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"CrossPages(inputs={self.tables.num_rows}, width={self.width})"


class PagedEncoderDecoderCache(EncoderDecoderCache):
    """The EncoderDecoderCache generate() drives on a wrapped encoder-decoder model: a PagedCache for
    the decoder's self-attention, its CrossPages for cross-attention."""

    def __init__(self, self_attention_cache, cross_attention_cache: CrossPages):
        super().__init__(self_attention_cache, cross_attention_cache)

    def crop(self, tokens_to_remove: int) -> None:
        self.self_attention_cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.self_attention_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.self_attention_cache.batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)

    def release(self) -> None:
        self.self_attention_cache.release()


def _runs(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Length and first column of each row's one run of tokens in a `[rows, width]` bool mask;
    ValueError for a mask with pads between tokens."""
    lengths = mask.sum(dim=1)
    first = mask.int().argmax(dim=1)
    columns = torch.arange(mask.shape[1], device=mask.device)[None]
    run = (columns >= first[:, None]) & (columns < (first + lengths)[:, None])
    if not bool((run == mask).all()):
        raise ValueError(
            "an encoder-decoder source's attention_mask has pads between tokens; hf_paged takes right-padded "
            "sources (as seq2seq tokenizers pad them) or left-padded ones, one run of tokens per row"
        )
    return lengths.tolist(), first.tolist()
