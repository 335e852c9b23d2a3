"""PagedCache: the transformers `Cache` that generate() drives, backed by a KVPool."""

import weakref

import torch
from transformers.cache_utils import Cache

from .. import _compat
from ..attention import Executor
from ..memory.group_pages import GroupPages
from ..memory.groups import GroupSpec, group_of_layer
from ..memory.tables import PageTables
from . import inflight
from .cross import CrossPages
from .runtime import Runtime, runtime_of
from .steps import ForwardSteps


class PagedCache(ForwardSteps, Cache):
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
        # An encoder-decoder model: its cross-attention layers' pages, one table per input (cross.py).
        self.cross: CrossPages | None = None
        if self.groups and self.groups[-1].cross:
            cross_group, self.groups = self.groups[-1], self.groups[:-1]
            self.cross = CrossPages(pool, cross_group, len(cross_group.layers))
        cross = (self.cross.tables, pool.layer_bytes(cross_group.layers)) if self.cross is not None else None
        # Page bookkeeping per group of layers, and the peaks (group_pages.py).
        self.pages = GroupPages(pool.blocks, self.groups, [pool.layer_bytes(group.layers) for group in self.groups], cross)
        self.group_tables: list[PageTables] = self.pages.group_tables
        # A cache dropped without release() gives its pages back once collected (KVPool.cache_dropped).
        dropped = self.group_tables + [self.cross.tables] if self.cross is not None else self.group_tables
        self._finalizer = weakref.finalize(self, pool.cache_dropped, dropped)
        self.layer_group = group_of_layer(self.groups, pool.num_layers)
        modules = self.runtime.attention_modules
        self.applies_window = [
            group.window is not None and all(inflight.applies_window(modules[layer], group.window) for layer in group.layers)
            for group in self.groups
        ]
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
        # Off with PagedConfig(exact=True): its log-sum-exp merge adds in another order than stock's softmax.
        self.cascade = (self.executor.cascade_by_default if cascade is None else cascade) and not self.runtime.config.exact
        if self.cross is not None:  # stock's scores bit for bit (seq2seq decoders are short: cascade rarely pays)
            self.cascade = False
        self.max_tokens_per_row = max_tokens_per_row if self.executor.reads_in_place else None
        self.returned_num_beams: int | None = None  # set when generate() returns this cache (num_beams of that call)
        self.has_holes = False  # a mask with a pad after a real token has been seen (steps.begin_forward)
        self._init_steps()  # what each forward and layer reads (steps.py)

    def returned_by_generate(self, num_beams: int) -> None:
        """generate() returns this cache in its output: it stays open (its pages held) until the
        caller drops it or calls `release()`; memory_stats() counts such caches' pages."""
        self.returned_num_beams = num_beams
        self.pool.returned_caches.add(self)

    def __deepcopy__(self, memo: dict) -> "PagedCache":
        """A second cache on the same pool with the same rows, sharing every page (no K/V is
        copied until one of them writes into a shared, partly filled page), as `copy.deepcopy` of
        stock's cache gives an independent copy. Release or drop each on its own."""
        self._check_usable()
        if self._forward is not None or self.cross is not None:
            raise TypeError(
                "a PagedCache can be copied only between forwards and for decoder-only models "
                "(an encoder-decoder cache's cross-attention pages are not copied)"
            )
        owner = self.runtime.model()
        if owner is None:
            raise TypeError("this PagedCache's model is no longer wrapped (or no longer exists): it cannot be copied")
        copy = type(self)(owner)
        if copy.pool is not self.pool:  # the model's dtype or device changed since: other pages
            copy.release()
            raise TypeError("the model's page pool changed since this PagedCache was created: it cannot be copied")
        with self.pool.blocks.lock:
            for mine, theirs in zip(copy.group_tables, self.group_tables):
                mine.copy_rows_from(theirs)
        copy.seq_length, copy.recording, copy.has_holes = self.seq_length, self.recording, self.has_holes
        copy.returned_num_beams = self.returned_num_beams
        if self.returned_num_beams is not None:
            self.pool.returned_caches.add(copy)
        memo[id(self)] = copy
        return copy

    def held_page_ids(self) -> set[int]:
        """The page ids this cache's rows hold, every group together."""
        return {page for tables in self.group_tables for table in tables.page_tables for page in tables.held(table)}

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

    def _cache_kwarg(self) -> str:
        """The keyword the installed transformers release takes the cache under (for messages)."""
        return _compat.model_cache_arg(self.runtime.decoder)

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, for models that do not pass it to the attention function."""
        return self._layer_windows[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens per row before the current forward (pads included), as transformers expects."""
        if self._forward is not None:  # begin_forward has already placed this forward's tokens
            return self.seq_length - self._forward.meta.q_len
        return self.seq_length

    @property
    def dense_forward(self) -> bool:
        """Whether the running forward is dense (dense.py): its layers run stock attention on the
        padded K/V `update` returns."""
        return self._forward is not None and self._forward.dense is not None

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self.dense_forward:  # stock's sizes: a sliding layer's cache keeps its window (dense.py)
            start = self._forward.dense.kept(layer_idx)
            return self.get_seq_length() - start + query_length, start
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
        if self.cross is not None:
            self.cross.select_rows(row_ids)

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
        self.has_holes = False
        self._forget_built()

    def release(self) -> None:
        """Give every page back to the pool. The cache cannot be used afterwards."""
        if self._forward is not None:
            self.pages.release_deferred(self._forward.deferred)
        self.pages.release()
        if self.cross is not None:
            self.cross.release()
        self.seq_length = 0
        self._forward = None
        self._forget_built()
        self.is_released = True
        self.pool.returned_caches.discard(self)
        self._finalizer.detach()
        self.pool.close_cache(self)

    def _check_usable(self) -> None:
        if self.is_released and self.cross is not None:
            raise RuntimeError(
                "this encoder-decoder PagedCache was released: generate() releases the cache it creates for an "
                "encoder-decoder model when it returns, also with return_dict_in_generate=True (continuing from it "
                "is not supported); run a continuation as a new generate() call"
            )
        if self.is_released:
            raise RuntimeError(
                "this PagedCache was released (by release(), or by the generate() call that created it: one "
                "without return_dict_in_generate=True returns no cache and releases it); "
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
        if self.dense_forward:  # stock's answer, which picks the layer each mask is sized for (dense.py)
            return [window is not None for window in self._forward.dense.windows]
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
