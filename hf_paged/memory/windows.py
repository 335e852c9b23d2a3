"""Sliding-window page tables (methods of PageTables): pages no later query sees become holes.

In a group with a sliding window (groups.py), `drop_out_of_window` replaces pages no later query
can see by `hole`, an id no page has (the pool's zero page), so every entry keeps its position;
windows release from the front only, so a row's holes are `table[:num_leading_holes[row]]`. A
forward can skip storing tokens no later query sees (`_skip_to`, from `append_skipping`), and
rows can start from the prefix cache's window snapshots, holes included (`adopt`).
"""


class WindowHoles:
    """PageTables' window methods; state: `window`, `hole`, `num_leading_holes`, `num_released`."""

    def drop_out_of_window(self) -> int:
        """Release every page that no query from each row's next token on can see; returns how many.

        The next query of a row holding n tokens sits at position n and sees keys from
        n - window + 1 on: pages that end before that are released (shared ones lose a reference).
        """
        if self.window is None:
            return 0
        page_size, hole, dropped = self.page_size, self.hole, 0
        if all(max(0, n - self.window + 1) // page_size <= lead for n, lead in zip(self.num_tokens, self.num_leading_holes)):
            return 0  # (most steps: nothing has left the window; the page lists stay as they are)
        with self._changing_pages():
            for row, table in enumerate(self.page_tables):
                num_dead = max(0, self.num_tokens[row] - self.window + 1) // page_size
                if num_dead <= self.num_leading_holes[row]:
                    continue
                release = table[self.num_leading_holes[row]:num_dead]
                self.blocks.free(release)
                table[self.num_leading_holes[row]:num_dead] = [hole] * len(release)
                self.num_leading_holes[row] = num_dead
                dropped += len(release)
            self.num_released += dropped
        return dropped

    def adopt(self, row: int, page_ids: list[int], num_tokens: int, extend: bool = False) -> None:
        """Start the empty row `row` (or, `extend`, continue a row of full pages) with shared full
        pages `page_ids` holding `num_tokens` tokens. In a sliding group, `page_ids` may hold holes
        (pages the prefix cache kept no window in): the row's pages before its last hole are then
        out of its window and are given back, as `drop_out_of_window` would."""
        held = self.num_tokens[row]
        hole = self.hole
        if (held and not extend) or held % self.page_size or num_tokens != len(page_ids) * self.page_size:
            raise ValueError(f"row {row} must hold only full pages, and the pages be full: {num_tokens} tokens in {len(page_ids)}")
        if self.window is None and hole in page_ids:
            raise ValueError(f"row {row} of a group without a window cannot adopt released pages")
        table = self.page_tables[row] + list(page_ids)
        lead = max((index + 1 for index, page in enumerate(table) if page == hole), default=0)
        with self._changing_pages():
            self.blocks.fork([page for page in page_ids if page != hole])
            self.blocks.free([page for page in table[:lead] if page != hole])
        table[:lead] = [hole] * lead
        self.page_tables[row] = table
        self.num_leading_holes[row] = lead
        self.num_tokens[row] = held + num_tokens
        self._end_reservation(row)

    def _skip_to(self, row: int, first_page: int) -> list[int]:
        """Make entries `:first_page` of row `row` holes (pages it will not store tokens in); returns
        the pages it held there, whose references pass to the caller."""
        table, lead, hole = self.page_tables[row], self.num_leading_holes[row], self.hole
        if first_page <= lead:
            return []
        held = [page for page in table[lead:first_page] if page != hole]
        table[lead:first_page] = [hole] * (min(first_page, len(table)) - lead)
        table.extend([hole] * (first_page - len(table)))
        self.num_leading_holes[row] = first_page
        self.num_released += first_page - lead  # pages the window has let go of, stored or not
        self._end_reservation(row)
        return held

    def release_deferred(self, pages: list[int]) -> None:
        """Give back the pages `append` handed over when it skipped tokens (the forward is over)."""
        with self._changing_pages():
            self.blocks.free(pages)

    def check_crop(self, num_tokens_to_remove: list[int]) -> None:
        """Raise ValueError if `crop` would leave a row needing a page its window has released."""
        if self.window is None:
            return
        for row, num_remove in enumerate(num_tokens_to_remove):
            if num_remove <= 0:
                continue
            remaining = max(0, self.num_tokens[row] - num_remove)
            needed = self.page_tables[row][max(0, remaining - self.window + 1) // self.page_size :]
            if self.hole in needed:
                raise ValueError(
                    f"cannot crop {num_remove} tokens: pages the window has already released would be "
                    "needed again; call cache.activate_past_recording() before the forwards you may crop"
                )
