"""Per-row page tables on a BlockManager: append, fork, reorder, crop, release. No torch.

A row is one sequence of the batch (a beam, a sample). Its page table lists the pages that hold
its tokens in order; every page but the last is full. Rows may share pages; a row about to write
into a shared, partly filled last page first gets its own copy (copy-on-write), and the copy is
returned to the caller as a (source, destination) pair so that the K/V move happens in one
batched copy per step.

Two concerns live beside it, as methods PageTables inherits: reserved runs of consecutive pages
(reservations.py) and a sliding window's holes (windows.py).

Several PageTables (caches of concurrent calls) share one BlockManager: every method that changes
pages holds `blocks.lock` from its check to its last change. Pages are never shared between
tables, so the change of the pool's used and shared counts while a table holds the lock is that
table's own: that is how each table counts its pages and its peaks without mixing calls.
"""

import contextlib
from collections.abc import Iterator

from ..errors import OutOfPagesError
from .blocks import BlockManager
from .reservations import Reservations, num_pages_for
from .windows import WindowHoles


class PageTables(Reservations, WindowHoles):
    """The page tables and token counts of the rows of one cache."""

    def __init__(self, blocks: BlockManager, page_size: int, window: int | None = None):
        self.blocks = blocks
        self.page_size = page_size
        # Sliding window (groups.py): `drop_out_of_window` replaces pages no later query can see by
        # `hole`, an id no page has (the pool's zero page), so every entry keeps its position.
        self.window = window
        self.hole = blocks.num_pages
        self.num_released = 0  # pages drop_out_of_window has let go of
        self.page_tables: list[list[int]] = []
        self.num_tokens: list[int] = []
        # Leading holes of each row: windows release from the front only, so a row's holes are
        # `table[:num_leading_holes[row]]`, and the metadata starts each row after them.
        self.num_leading_holes: list[int] = []
        # Reservation: row i's next page is to be `home[i] + len(table)` (< home[i] + stride); -1: none.
        self.home: list[int] = []
        self.stride = 0
        # This table's pages (distinct, and those held by several of its rows), now and at their peak.
        self.num_pages_held = 0
        self.num_shared_held = 0
        self.peak_pages_held = 0
        self.peak_shared_held = 0
        # Counts the changes that may have changed page lists (`_changing_pages`, `add_rows`): metadata
        # built at one version holds for the next forward whose tokens go `in_place_slots`.
        self.version = 0

    @contextlib.contextmanager
    def _changing_pages(self) -> Iterator[None]:
        """Hold the pool's lock and count what this table's change did to the pool."""
        blocks = self.blocks
        self.version += 1
        with blocks.lock:
            used, shared, evicted = blocks.num_used_pages, blocks.num_shared_pages, blocks.num_evicted_pages
            try:
                yield
            finally:
                # Pages the prefix cache gave back to make room were not this table's: add them back.
                self.num_pages_held += blocks.num_used_pages - used + blocks.num_evicted_pages - evicted
                self.num_shared_held += blocks.num_shared_pages - shared
                self.peak_pages_held = max(self.peak_pages_held, self.num_pages_held)
                self.peak_shared_held = max(self.peak_shared_held, self.num_shared_held)

    @property
    def num_rows(self) -> int:
        return len(self.page_tables)

    def add_rows(self, num_rows: int) -> None:
        """Append `num_rows` empty rows."""
        self.version += 1
        self.page_tables.extend([] for _ in range(num_rows))
        self.num_tokens.extend([0] * num_rows)
        self.num_leading_holes.extend([0] * num_rows)
        self.home.extend([-1] * num_rows)

    def held(self, table: list[int]) -> list[int]:
        """The pages `table` holds a reference to (its holes left out)."""
        hole = self.hole
        return [page for page in table if page != hole]

    def in_place_slots(self, num_new_tokens: list[int]) -> list[int] | None:
        """The slots of `num_new_tokens[i]` more tokens in row i when every row's fit in its last
        page, which it alone holds (most decode steps): then `advance` stores them and no page
        changes hands. None otherwise (`append` places them). Changes nothing."""
        page_size, ref_counts = self.page_size, self.blocks.ref_counts
        slots: list[int] = []
        for table, num_tokens, num_new in zip(self.page_tables, self.num_tokens, num_new_tokens):
            offset = num_tokens % page_size
            if not offset or offset + num_new > page_size or ref_counts[table[-1]] != 1:
                if num_new:
                    return None
                continue
            first = table[-1] * page_size + offset
            if num_new == 1:
                slots.append(first)
            else:
                slots.extend(range(first, first + num_new))
        return slots

    def advance(self, num_new_tokens: list[int]) -> None:
        """Count the tokens `in_place_slots` placed."""
        self.num_tokens = [n + new for n, new in zip(self.num_tokens, num_new_tokens)]

    def num_pages_to_append(self, num_new_tokens: list[int], skip: list[int] | None = None) -> int:
        """Pages `append(num_new_tokens, skip)` takes from the pool, copies for copy-on-write included."""
        page_size = self.page_size
        ref_counts = self.blocks.ref_counts
        # The last row to write into a shared partial page finds it unshared and writes in place.
        remaining_refs: dict[int, int] = {}
        num_needed = 0
        for row, (table, num_tokens, num_new) in enumerate(zip(self.page_tables, self.num_tokens, num_new_tokens)):
            if num_new == 0:
                continue
            first = num_tokens + (skip[row] if skip else 0)  # the first token stored
            if first % page_size:  # (then first == num_tokens: a skip ends on a page boundary)
                last = table[-1]
                refs = remaining_refs.get(last, ref_counts[last])
                if refs > 1:
                    num_needed += 1
                    remaining_refs[last] = refs - 1
            num_needed += num_pages_for(num_tokens + num_new, page_size) - max(len(table), first // page_size)
        return num_needed

    def append(self, num_new_tokens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Make room for `num_new_tokens[i]` more tokens in row i.

        Returns the slot (`page_id * page_size + offset`) of every new token, row by row, and the
        (source, destination) page copies to perform before anything is written. Raises
        OutOfPagesError before changing anything when the pool is too small.
        """
        slots, copies, _ = self.append_skipping(num_new_tokens, None)
        return slots, copies

    def append_skipping(
        self, num_new_tokens: list[int], skip: list[int] | None
    ) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """`append`, where the first `skip[i]` new tokens of row i are not stored (a sliding window's
        tokens no later query sees; the skip ends on a page boundary, so the pages they would fill
        are holes).

        Returns the slots of the stored new tokens, the copies, and the pages of the rows' past that
        the skip turned into holes: the caller still holds them (this forward's queries read them)
        and gives them back with `release_deferred` once the forward ends.
        """
        if len(num_new_tokens) != self.num_rows:
            raise ValueError(f"expected {self.num_rows} token counts, got {len(num_new_tokens)}")
        with self._changing_pages():
            return self._append(num_new_tokens, skip)

    def _append(
        self, num_new_tokens: list[int], skip: list[int] | None
    ) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        num_needed = self.num_pages_to_append(num_new_tokens, skip)
        if not self.blocks.can_allocate(num_needed):
            raise OutOfPagesError(num_needed, self.blocks.num_available_pages, self.blocks.num_pages)
        page_size = self.page_size
        blocks = self.blocks
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        deferred: list[int] = []
        for row, num_new in enumerate(num_new_tokens):
            if num_new == 0:
                continue
            table = self.page_tables[row]
            start = self.num_tokens[row]
            end = start + num_new
            first = start + skip[row] if skip else start
            if first != start:
                deferred += self._skip_to(row, first // page_size)
            if first % page_size and blocks.is_shared(table[-1]):
                (own,) = blocks.allocate(1)
                copies.append((table[-1], own))
                blocks.free([table[-1]])
                table[-1] = own
                self._end_reservation(row)
            grow = num_pages_for(end, page_size) - len(table)
            if grow and self.home[row] >= 0:
                grow = self._take_reserved(row, grow)
            if grow:
                table.extend(blocks.allocate(grow))
            slots.extend(table[t // page_size] * page_size + t % page_size for t in range(first, end))
            self.num_tokens[row] = end
        return slots, copies, deferred

    def copy_rows_from(self, other: "PageTables") -> None:
        """Become a copy of `other`'s rows (this table is empty, on the same pool): the rows share
        every page, each held page gains a reference, and a shared partly filled page is copied on
        its next write, as after `select_rows`."""
        with self._changing_pages():
            self.page_tables = [list(table) for table in other.page_tables]
            self.num_tokens = list(other.num_tokens)
            self.num_leading_holes = list(other.num_leading_holes)
            self.home = [-1] * len(self.page_tables)
            self.num_released = other.num_released
            self.blocks.fork([page for table in self.page_tables for page in self.held(table)])
            self.num_pages_held = len({page for table in self.page_tables for page in self.held(table)})

    def select_rows(self, row_ids: list[int]) -> None:
        """Replace the rows by `[row[i] for i in row_ids]`: reorder, repeat or drop rows, sharing pages."""
        with self._changing_pages():
            self._select_rows(row_ids)

    def _select_rows(self, row_ids: list[int]) -> None:
        for row_id in row_ids:
            if not 0 <= row_id < self.num_rows:
                raise IndexError(f"row {row_id} out of range for {self.num_rows} rows")
        new_tables = [list(self.page_tables[i]) for i in row_ids]
        new_tokens = [self.num_tokens[i] for i in row_ids]
        new_holes = [self.num_leading_holes[i] for i in row_ids]
        # Take the new references before dropping the old, so no kept page passes through zero.
        for table in new_tables:
            self.blocks.fork(self.held(table))
        for row in range(self.num_rows):
            self._end_reservation(row)  # rows now share pages: reservations end
        for table in reversed(self.page_tables):
            self.blocks.free(self.held(table))
        self.page_tables = new_tables
        self.num_tokens = new_tokens
        self.num_leading_holes = new_holes
        self.home = [-1] * len(row_ids)

    def crop(self, num_tokens_to_remove: list[int]) -> None:
        """Drop the last `num_tokens_to_remove[i]` tokens of row i, releasing pages past the end.

        Raises ValueError, changing nothing, when a row would need a page its window has released.
        """
        self.check_crop(num_tokens_to_remove)
        with self._changing_pages():
            self._crop(num_tokens_to_remove)

    def _crop(self, num_tokens_to_remove: list[int]) -> None:
        for row, num_remove in enumerate(num_tokens_to_remove):
            if num_remove <= 0:
                continue
            table = self.page_tables[row]
            remaining = max(0, self.num_tokens[row] - num_remove)
            keep = num_pages_for(remaining, self.page_size)
            self.blocks.free(self.held(table[keep:]))
            del table[keep:]
            self.num_tokens[row] = remaining

    def release(self) -> None:
        """Return every page of every row, last row and last page first."""
        with self._changing_pages():
            for row in range(self.num_rows):
                self._end_reservation(row)
            for table in reversed(self.page_tables):
                self.blocks.free(self.held(table))
        self.page_tables = []
        self.num_tokens = []
        self.num_leading_holes = []
        self.home = []

    def num_unique_tokens(self) -> int:
        """Tokens stored once however many rows share them (for the memory bound)."""
        page_size = self.page_size
        filled: dict[int, int] = {}
        for table, num_tokens in zip(self.page_tables, self.num_tokens):
            for index, page_id in enumerate(table):
                if page_id == self.hole:
                    continue
                used = min(page_size, num_tokens - index * page_size)
                filled[page_id] = max(filled.get(page_id, 0), used)
        return sum(filled.values())
