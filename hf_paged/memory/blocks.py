"""Reference-counted page ids. Integer bookkeeping only: this module never imports torch.

A page is one unit of the pool (`page_size` token slots in every layer). The free list is a
stack: the page freed last is handed out first, so a short-lived request keeps reusing the same
few pages (warm in cache, and on CPU the untouched rest of the pool is never committed). A caller
may also ask for one particular free page (`take`), and for the first page of a run of free pages
(`find_free_run`): that is how rows that share nothing get consecutive pages (PageTables.reserve).
"""

import threading
from typing import Protocol

from ..errors import OutOfPagesError


class Evictor(Protocol):
    """Holds pages that can be given back on demand (the prefix cache's unreferenced pages)."""

    def num_evictable(self) -> int: ...

    def evict(self, num: int) -> int: ...


class BlockManager:
    """Owns page ids `0 .. num_pages-1`: their reference counts and the free list.

    Several caches (threads) share one BlockManager. The methods here do not lock; a caller that
    checks and then mutates (PageTables) holds `lock` across both, so no other thread can take the
    pages it counted on in between. Reentrant, so a locked caller may call another locked one.
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"expected num_pages >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.lock = threading.RLock()
        self.ref_counts = [0] * num_pages
        # Stack, top at the end: page 0 is handed out first on a fresh pool.
        self.free_page_ids = list(range(num_pages - 1, -1, -1))
        # Where each free page sits in the stack (-1: in use), and a byte per page (1: free).
        self._stack_index = list(range(num_pages - 1, -1, -1))
        self._free_flags = bytearray(b"\x01") * num_pages
        self.num_shared_pages = 0
        # Asked for pages when the free list is short, before anything is refused.
        self.evictor: Evictor | None = None
        self.num_evicted_pages = 0
        # Free pages promised to a row's reservation (PageTables.reserve): `allocate` hands them out
        # last, so other rows of the cache (another group of layers) do not break the run.
        self._reserved = bytearray(num_pages)
        self.num_reserved = 0

    @property
    def num_free_pages(self) -> int:
        return len(self.free_page_ids)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free_page_ids)

    @property
    def num_available_pages(self) -> int:
        """Free pages plus the pages the evictor would give back."""
        evictable = self.evictor.num_evictable() if self.evictor is not None else 0
        return len(self.free_page_ids) + evictable

    def can_allocate(self, num: int) -> bool:
        return num <= len(self.free_page_ids) or num <= self.num_available_pages

    def allocate(self, num: int) -> list[int]:
        """Take `num` free pages, each with reference count 1, evicting cached pages if short.

        Raises before changing anything when even evicting every evictable page is not enough.
        """
        if num > len(self.free_page_ids):
            if not self.can_allocate(num):
                raise OutOfPagesError(num, self.num_available_pages, self.num_pages)
            self.num_evicted_pages += self.evictor.evict(num - len(self.free_page_ids))
        if num == 0:
            return []
        if self.num_reserved:
            return self._allocate_around_reservations(num)
        page_ids = self.free_page_ids[-num:][::-1]
        del self.free_page_ids[-num:]
        for page_id in page_ids:
            self.ref_counts[page_id] = 1
            self._stack_index[page_id] = -1
            self._free_flags[page_id] = 0
        return page_ids

    def _allocate_around_reservations(self, num: int) -> list[int]:
        """`num` pages from the top of the free stack, unreserved ones first."""
        reserved = self._reserved
        chosen = [page for page in reversed(self.free_page_ids) if not reserved[page]][:num]
        if len(chosen) < num:  # under pressure a reservation gives way: it holds no memory
            chosen += [page for page in reversed(self.free_page_ids) if reserved[page]][: num - len(chosen)]
        for page in chosen:
            self.take(page)
        return chosen

    def reserve(self, page_ids: range, on: bool = True) -> None:
        """Mark free pages as promised to a reservation (or, `on=False`, no longer)."""
        flag = 1 if on else 0
        for page in page_ids:
            if self._reserved[page] != flag and (not on or self._stack_index[page] >= 0):
                self._reserved[page] = flag
                self.num_reserved += 1 if on else -1

    def take(self, page_id: int) -> bool:
        """Take the free page `page_id` (reference count 1); False, changing nothing, if it is in use.

        O(1): the top of the free stack moves into the taken page's place.
        """
        index = self._stack_index[page_id]
        if index < 0:
            return False
        top = self.free_page_ids.pop()
        if top != page_id:
            self.free_page_ids[index] = top
            self._stack_index[top] = index
        self._stack_index[page_id] = -1
        self._free_flags[page_id] = 0
        self.ref_counts[page_id] = 1
        if self._reserved[page_id]:
            self._reserved[page_id] = 0
            self.num_reserved -= 1
        return True

    def find_free_run(self, length: int, highest: bool = False) -> int | None:
        """The first page of the lowest (or `highest`) run of `length` consecutive free pages, or None."""
        if length < 1 or length > len(self.free_page_ids):
            return None
        run = b"\x01" * length
        start = self._free_flags.rfind(run) if highest else self._free_flags.find(run)
        return None if start < 0 else start

    def fork(self, page_ids: list[int]) -> None:
        """Add one reference to each page (a second table now holds it)."""
        ref_counts = self.ref_counts
        for page_id in page_ids:
            if ref_counts[page_id] < 1:
                raise ValueError(f"page {page_id} is free and cannot be shared")
        for page_id in page_ids:
            ref_counts[page_id] += 1
            if ref_counts[page_id] == 2:
                self.num_shared_pages += 1

    def free(self, page_ids: list[int]) -> None:
        """Drop one reference to each page, tail first; a page whose count reaches 0 is free again."""
        ref_counts = self.ref_counts
        for page_id in page_ids:
            if ref_counts[page_id] < 1:
                raise ValueError(f"page {page_id} is already free")
        for page_id in reversed(page_ids):
            count = ref_counts[page_id] - 1
            ref_counts[page_id] = count
            if count == 1:
                self.num_shared_pages -= 1
            elif count == 0:
                self._stack_index[page_id] = len(self.free_page_ids)
                self._free_flags[page_id] = 1
                self.free_page_ids.append(page_id)

    def is_shared(self, page_id: int) -> bool:
        return self.ref_counts[page_id] > 1
