"""Reference-counted page ids. Integer bookkeeping only: this module never imports torch.

A page is one unit of the pool (`page_size` token slots in every layer). The free list is a
stack: the page freed last is handed out first, so a short-lived request keeps reusing the same
few pages (warm in cache, and on CPU the untouched rest of the pool is never committed).
"""

from .errors import OutOfPagesError


class BlockManager:
    """Owns page ids `0 .. num_pages-1`: their reference counts and the free list."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"expected num_pages >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = [0] * num_pages
        # Stack, top at the end: page 0 is handed out first on a fresh pool.
        self.free_page_ids = list(range(num_pages - 1, -1, -1))
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
        self._note_peaks()
        return page_ids

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
