"""Reserved runs of consecutive pages (methods of PageTables) and the check that page lists form one.

Rows that will share nothing (greedy or sampled decoding of distinct prompts) can `reserve` a run
of consecutive free pages each, at a fixed stride: each then takes its pages in order from its
run as it grows, so its tokens lie contiguously in every layer's pool and the torch executor reads
all rows as one strided view instead of gathering them (it checks the page lists themselves with
`consecutive_run`). A reservation holds no page: a page is taken only when a token needs it, and a
page someone else holds meanwhile is simply allocated elsewhere, which ends the row's reservation.
"""


def num_pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class Reservations:
    """PageTables' reservation methods; state: `home` (row i's next page is `home[i] + len(table)`,
    -1: none) and `stride`, kept by PageTables."""

    def reserve(self, tokens_per_row: int, highest: bool = False) -> bool:
        """Give every (empty) row a run of pages for `tokens_per_row` tokens, rows back to back.

        Returns False, changing nothing, when some row already holds tokens or the pool has no free
        run of `rows * pages_per_row` pages.
        """
        stride = num_pages_for(tokens_per_row, self.page_size)
        if not self.num_rows or stride < 1 or any(self.num_tokens):
            return False
        # `highest`: at the top of the pool, away from the pages the free stack hands out first
        # (other groups of the same cache allocate from there while these rows grow).
        with self.blocks.lock:  # a consistent free map (the run may still be taken by others later)
            first = self.blocks.find_free_run(self.num_rows * stride, highest)
        if first is None:
            return False
        self.home = [first + row * stride for row in range(self.num_rows)]
        self.stride = stride
        self.blocks.reserve(range(first, first + self.num_rows * stride))
        return True

    def _take_reserved(self, row: int, grow: int) -> int:
        """Take the row's next reserved pages; returns how many pages are still to allocate."""
        table, home = self.page_tables[row], self.home[row]
        while grow and len(table) < self.stride and self.blocks.take(home + len(table)):
            table.append(home + len(table))
            grow -= 1
        if grow:
            self._end_reservation(row)  # the run is broken: the rest comes from the free stack
        return grow

    def _end_reservation(self, row: int) -> None:
        """Row `row` takes no more reserved pages; the rest of its run is free for anyone."""
        home = self.home[row]
        if home >= 0:
            self.blocks.reserve(range(home + len(self.page_tables[row]), home + self.stride), on=False)
            self.home[row] = -1


def consecutive_run(page_lists: list[list[int]], num_pages: int) -> tuple[int, int] | None:
    """(first, stride) when `page_lists[i] == [first + i * stride, first + i * stride + 1, ...]`, all
    of one non-zero length, `stride >= length` (the lists' runs never overlap) and the last run
    ends within `num_pages`; else None. Then the lists are one strided view of a page pool."""
    if not page_lists or not page_lists[0]:
        return None
    first, length = page_lists[0][0], len(page_lists[0])
    stride = page_lists[1][0] - first if len(page_lists) > 1 else length
    if stride < length or first + len(page_lists) * stride > num_pages:
        return None
    for i, pages in enumerate(page_lists):
        start = first + i * stride
        if pages != list(range(start, start + length)):
            return None
    return first, stride
