"""Reference-counted page ids. Integer bookkeeping only: this module never imports torch.

A page is one unit of the pool (`page_size` token slots in every layer). The free list is a
stack: the page freed last is handed out first, so a short-lived request keeps reusing the same
few pages (warm in cache, and on CPU the untouched rest of the pool is never committed). A caller
may also ask for one particular free page (`take`), and for the first page of a run of free pages
(`find_free_run`): that is how rows that share nothing get consecutive pages (PageTables.reserve).
"""

import threading

from .errors import OutOfPagesError


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
        self.peak_used_pages = 0
        self.peak_shared_pages = 0

    @property
    def num_free_pages(self) -> int:
        return len(self.free_page_ids)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free_page_ids)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self.free_page_ids)

    def allocate(self, num: int) -> list[int]:
        """Take `num` free pages, each with reference count 1. Raises before changing anything."""
        if num > len(self.free_page_ids):
            raise OutOfPagesError(num, len(self.free_page_ids), self.num_pages)
        if num == 0:
            return []
        page_ids = self.free_page_ids[-num:][::-1]
        del self.free_page_ids[-num:]
        for page_id in page_ids:
            self.ref_counts[page_id] = 1
            self._stack_index[page_id] = -1
            self._free_flags[page_id] = 0
        self._note_peaks()
        return page_ids

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
        self._note_peaks()
        return True

    def find_free_run(self, length: int) -> int | None:
        """The first page of the lowest run of `length` consecutive free pages, or None."""
        if length < 1 or length > len(self.free_page_ids):
            return None
        start = self._free_flags.find(b"\x01" * length)
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
        self._note_peaks()

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

    def reset_peaks(self) -> None:
        self.peak_used_pages = self.num_used_pages
        self.peak_shared_pages = self.num_shared_pages

    def _note_peaks(self) -> None:
        used = self.num_pages - len(self.free_page_ids)
        if used > self.peak_used_pages:
            self.peak_used_pages = used
        if self.num_shared_pages > self.peak_shared_pages:
            self.peak_shared_pages = self.num_shared_pages
