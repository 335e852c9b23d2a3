"""GroupPages: one cache's page tables, one PageTables per group of layers (groups.py), and its peaks.

Every change that takes pages checks all groups' need before any group takes one, under the
pool's lock (other caches share the pool). Rows are the same in every group: adding, forking,
reordering, cropping or releasing rows acts on every group.

Peaks: page ids are held by one group at a time and every id reserves `pool.page_bytes`
(layout.py), so the pool a cache needs at an instant is the ids all its groups hold then.
`peak_pool_pages` is the highest that count got, noted right after each forward's pages are
taken (the forward holds them until its end, while its layers run); `peak_group_pages` /
`peak_kv_bytes` are what the rows held after each forward, once windows let go of what no later
query sees (the measure of stock's window-only cache, each group's pages at the bytes its layers use).
"""

from ..errors import OutOfPagesError
from .blocks import BlockManager
from .groups import GroupSpec
from .tables import PageTables


class GroupPages:
    """The page tables of one cache's rows in every group of layers."""

    def __init__(self, blocks: BlockManager, groups: list[GroupSpec], group_page_bytes: list[int],
                 cross: tuple[PageTables, int] | None = None):
        self.blocks = blocks
        # An encoder-decoder model's cross-attention pages (cache/cross.py) and the bytes its layers use
        # per id: counted in every peak, never touched by the rows' changes below.
        self.cross = cross
        self.groups = groups  # the runtime's list (a group may be marked `cache_window` later)
        self.group_tables = [PageTables(blocks, group.page_size, group.window) for group in groups]
        self.group_page_bytes = group_page_bytes
        self.peak_group_pages = [0] * (len(groups) + (cross is not None))
        self.peak_kv_bytes = 0
        self.peak_pool_pages = 0
        # Whether rows may hold more pages than when note_peaks last counted: only taking pages
        # (place, adopt) adds any, so a forward whose tokens went into pages its rows held changes no peak.
        self._uncounted = True

    @property
    def tables(self) -> PageTables:
        """The first group's page tables (row count, tokens per row: the same in every group)."""
        return self.group_tables[0]

    @property
    def num_pages_held(self) -> int:
        """Page ids this cache holds now, all groups (cross-attention pages included)."""
        held = sum(tables.num_pages_held for tables in self.group_tables)
        return held + (self.cross[0].num_pages_held if self.cross is not None else 0)

    def place(
        self, qo_lens: list[int], skips: list[list[int] | None] | None = None
    ) -> list[tuple[list[int], list[tuple[int, int]], list[int]]]:
        """Make room for `qo_lens[i]` new tokens in row i of every group, of which group g stores
        all but the first `skips[g][i]` (inflight.py; None: all): per group, the slots of the
        stored tokens, the copy-on-write copies and the pages a skip took out of the tables
        (PageTables.append_skipping). Raises OutOfPagesError before any group takes a page when
        the pool cannot hold them all."""
        if skips is None or not any(skips):
            in_place = [tables.in_place_slots(qo_lens) for tables in self.group_tables]
            if None not in in_place:  # every group's new tokens fit in pages its rows hold alone (no peak moves)
                for tables in self.group_tables:
                    tables.advance(qo_lens)
                return [(slots, [], []) for slots in in_place]
        skips = skips or [None] * len(self.group_tables)
        self._uncounted = True
        with self.blocks.lock:
            num_needed = sum(tables.num_pages_to_append(qo_lens, skip) for tables, skip in zip(self.group_tables, skips))
            if not self.blocks.can_allocate(num_needed):
                raise OutOfPagesError(num_needed, self.blocks.num_available_pages, self.blocks.num_pages)
            appended = [tables.append_skipping(qo_lens, skip) for tables, skip in zip(self.group_tables, skips)]
            held = self.num_pages_held if self.blocks.evictor is None else self._count_held(appended)
        self.peak_pool_pages = max(self.peak_pool_pages, held)
        return appended

    def _count_held(self, appended) -> int:
        """Page ids the rows hold now, counted one by one: with the prefix cache, a page a window let
        go of may stay in use by the cache, which the tables' own counts (pool used-page deltas)
        cannot tell from one they still hold."""
        held = {page for _, _, deferred in appended for page in deferred}
        for tables in self.group_tables:
            hole = tables.hole
            held.update(page for table in tables.page_tables for page in table if page != hole)
        return len(held)

    def release_deferred(self, deferred: dict[int, list[int]]) -> None:
        """Give back the pages a forward's skips took out of the tables (group -> pages), which it
        held while its layers ran (inflight.py)."""
        for group, pages in deferred.items():
            if pages:
                self.group_tables[group].release_deferred(pages)
        deferred.clear()

    def drop_out_of_window(self, keep_cache_windows: bool = False) -> None:
        """Sliding groups let go of what the next queries cannot see (`keep_cache_windows`: not the
        groups whose window is only the cache's, while a split prompt is still open)."""
        for spec, tables in zip(self.groups, self.group_tables):
            if not (spec.cache_window and keep_cache_windows):
                tables.drop_out_of_window()

    def note_peaks(self) -> None:
        """Pages each group's rows hold now, and the K/V bytes that makes, at their highest."""
        if not self._uncounted:
            return
        self._uncounted = False
        total = 0
        for group, tables in enumerate(self.group_tables):
            held = {page for table, lead in zip(tables.page_tables, tables.num_leading_holes) for page in table[lead:]}
            self.peak_group_pages[group] = max(self.peak_group_pages[group], len(held))
            total += len(held) * self.group_page_bytes[group]
        if self.cross is not None:
            tables, page_bytes = self.cross
            self.peak_group_pages[-1] = max(self.peak_group_pages[-1], tables.num_pages_held)
            total += tables.num_pages_held * page_bytes
        self.peak_kv_bytes = max(self.peak_kv_bytes, total)

    def note_cross_pages(self) -> None:
        """Count the cross-attention pages just taken (before the forward that writes them)."""
        self._uncounted = True
        self.peak_pool_pages = max(self.peak_pool_pages, self.num_pages_held)

    def reserve_rows(self, max_tokens_per_row: int | None) -> None:
        """Give the (empty) rows runs of consecutive pages in every full group."""
        for tables in self.group_tables:
            if max_tokens_per_row and tables.window is None:
                tables.reserve(max_tokens_per_row, highest=len(self.group_tables) > 1)

    def add_rows(self, num_rows: int) -> None:
        """Append `num_rows` empty rows to every group's tables."""
        for tables in self.group_tables:
            tables.add_rows(num_rows)

    def adopt(self, row: int, group_pages: list[list[int]], num_tokens: int, extend: bool = False) -> None:
        """Start the empty row `row` (`extend`: continue a row of full pages) with shared full pages,
        `group_pages[g]` in group g."""
        self._uncounted = True
        for tables, pages in zip(self.group_tables, group_pages):
            tables.adopt(row, pages, num_tokens, extend=extend)

    def select_rows(self, row_ids: list[int]) -> None:
        for tables in self.group_tables:
            tables.select_rows(row_ids)

    def crop(self, num_remove: int) -> None:
        """Drop the last `num_remove` tokens of every row; checks every group before any changes."""
        counts = [num_remove] * self.tables.num_rows
        for tables in self.group_tables:
            tables.check_crop(counts)
        for tables in self.group_tables:
            tables.crop(counts)

    def release(self) -> None:
        for tables in self.group_tables:
            tables.release()
