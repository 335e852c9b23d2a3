"""Prefix caching across generate() calls: full prompt pages outlive the call that computed them.

No torch: integer bookkeeping on the BlockManager, as blocks.py.

A page is keyed by a chain hash (blake2b) of its tokens and everything before them, so a key names
one exact token prefix (vLLM's automatic prefix caching). The cache holds one reference on each
page it keeps; a later prompt that starts with the same full pages takes references to them and
computes only its remainder. A cached page that nothing else references is *evictable*: when an
allocation finds the free list short, the BlockManager asks the cache to give back that many,
least recently used first, before any OutOfPagesError (which is raised only when evicting every
evictable page would still not be enough). A prompt touches its pages last page first, so the
first page of a shared prefix is the most recently used and the last to go: a chain is evicted
tail first and never loses a page its later pages need to be found.

Sliding-window groups (groups.py) keep only each row's window, so an entry holds their pages only
where a window was stored when the entry was kept (elsewhere the pool's hole id): a prompt reuses
the entries up to a key whose last `window - 1` tokens are all held in every sliding group, the
*window snapshot* a prefill leaves where it stops (prefill.py), and computes the rest.
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .blocks import BlockManager


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters since the cache was created (or last cleared with `reset_stats=True`)."""

    lookups: int = 0  # prompts (rows) looked up
    lookup_tokens: int = 0  # prompt tokens that could have hit (full pages before the last token)
    hits: int = 0  # pages found
    hit_tokens: int = 0  # tokens in those pages
    evictions: int = 0  # pages given back to the pool


def page_keys(tokens: list[int], page_size: int, num_pages: int) -> list[bytes]:
    """Chain keys of the first `num_pages` full pages of `tokens`: key i covers tokens[: (i+1) * page_size]."""
    keys: list[bytes] = []
    previous = b""
    for page in range(num_pages):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(array("q", tokens[page * page_size : (page + 1) * page_size]).tobytes())
        previous = digest.digest()
        keys.append(previous)
    return keys


# The pages of one key: per group of layers (groups.py), the pages holding the key's `page_size`
# tokens there (one, or more where the group's pages are smaller).
Entry = tuple[tuple[int, ...], ...]


def entry_pages(entry: Entry, hole: int = -1) -> list[int]:
    """The pages an entry holds (`hole`: the id of a page a window released, left out)."""
    return [page for pages in entry for page in pages if page != hole]


class PrefixCache:
    """Full prompt pages by chain key, one reference each, evicted least recently used first.

    An entry holds the pages of every group of layers (groups.py): the same tokens in every group.
    """

    def __init__(self, blocks: BlockManager, page_size: int):
        self.blocks = blocks
        self.page_size = page_size
        self.pages_of: dict[bytes, Entry] = {}
        self.key_of: dict[int, bytes] = {}  # every cached page -> its entry's key
        self.recency: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.stats = PrefixCacheStats()
        self.weights_key: object = None  # what the cached K/V were computed with (see check_weights)
        blocks.evictor = self

    @property
    def num_cached_pages(self) -> int:
        return len(self.key_of)

    def match(
        self, tokens: list[int], first_page: int = 0, groups: list[tuple[int | None, int]] | None = None
    ) -> list[Entry]:
        """Cached entries (pages per group) holding the longest page-aligned prefix of `tokens` that
        stops before its last token, from page `first_page` on (the caller holds the pages before),
        and after which every group holds what the next query sees: a full group every page, a
        sliding group the pages of its last `window - 1` tokens (where it holds none, its entry is
        all holes: a model of sliding groups only keeps no entry there).

        `groups`: (window, page size) of each group of layers (window None: the group keeps every
        token); None: every group keeps every token. The caller takes its own references to them.
        The last token is never covered: generate() feeds it, so the remainder to compute is never empty.
        """
        num_pages = (len(tokens) - 1) // self.page_size if tokens else 0
        keys = page_keys(tokens, self.page_size, num_pages)
        found = [self.pages_of.get(key) for key in keys]
        if groups is None or any(window is None for window, _ in groups):  # every entry up to the end
            end = first_page
            while end < num_pages and found[end] is not None:
                end += 1
            ends = range(end, first_page, -1)
        else:  # only the window's entries: any key found may end a hit
            ends = [end for end in range(num_pages, first_page, -1) if found[end - 1] is not None]
        usable = next((end for end in ends if self._holds_windows(found, first_page, end, groups)), first_page)
        hole = self.blocks.num_pages
        empty = tuple((hole,) * (self.page_size // size) for _, size in groups or [])
        entries = [found[index] or empty for index in range(first_page, usable)]
        self._touch([keys[index] for index in range(first_page, usable) if found[index] is not None])
        if first_page == 0:  # a second look for the same prompt looks up nothing new
            self.stats.lookups += 1
            self.stats.lookup_tokens += num_pages * self.page_size
        self.stats.hits += len(entries)
        self.stats.hit_tokens += len(entries) * self.page_size
        return entries

    def num_chained(self, tokens: list[int]) -> int:
        """Full pages of `tokens` before its last token up to the last key cached (another prompt
        went on from there, or ended), whether or not a window is held there (counts nothing)."""
        num_pages = (len(tokens) - 1) // self.page_size if tokens else 0
        keys = page_keys(tokens, self.page_size, num_pages)
        return next((index + 1 for index in range(num_pages - 1, -1, -1) if keys[index] in self.pages_of), 0)

    def _holds_windows(
        self, found: list[Entry | None], first_page: int, end: int, groups: list[tuple[int | None, int]] | None
    ) -> bool:
        """Whether the entries `found[first_page:end]` hold, in every group, the pages the query
        after them sees: all of a full group's, a sliding group's last `window - 1` tokens."""
        hole, stop = self.blocks.num_pages, end * self.page_size
        for group, (window, size) in enumerate(groups or []):
            start = first_page * self.page_size
            if window is not None:
                start = max(start, stop - window + 1)
            for index in range(start // self.page_size, end):
                entry = found[index]
                if entry is None:
                    return False
                offset = max(0, start - index * self.page_size) // size  # the entry's first page needed
                if hole in entry[group][offset:]:
                    return False
        return True

    def insert(
        self, tokens: list[int], group_tables: list[list[int]], group_page_sizes: list[int] | None = None
    ) -> None:
        """Keep the full pages that hold `tokens` (a row's real prompt tokens, in order); `group_tables`
        is the row's page table in each group, whose pages hold `group_page_sizes` tokens (default:
        `page_size`, which they must divide). Pages a window has released (holes) are not kept: the
        entry holds a hole there, which a later row that holds the page fills in; an entry holding
        no page at all is not kept.

        A key already kept takes the row's pages wherever the row holds one (`_merge`): the page
        it held there before is given back. A row computes a key's pages again when the kept entry
        could not be used (no window snapshot there, `match`); other rows of its batch then look the
        key up (prefill.py) and must find the computing row's pages, not a second copy of the same
        tokens, which the call would hold beside the row's (and run out of pages where one copy fits).
        """
        sizes = group_page_sizes or [self.page_size] * len(group_tables)
        per_key = [self.page_size // size for size in sizes]  # a group's pages per key
        num_pages = min([len(tokens) // self.page_size] + [len(table) // n for table, n in zip(group_tables, per_key)])
        hole = self.blocks.num_pages
        keys = page_keys(tokens, self.page_size, num_pages)
        for index, key in enumerate(keys):
            entry = tuple(tuple(table[index * n : (index + 1) * n]) for table, n in zip(group_tables, per_key))
            old = self.pages_of.get(key)
            replaced: list[int] = []
            if old is not None:
                entry, new, replaced = self._merge(old, entry)
            else:
                new = entry_pages(entry, hole)
                if not new or any(page in self.key_of for page in new):
                    continue  # released by a window everywhere, or kept under another key
            self.blocks.fork(new)
            self.pages_of[key] = entry
            for page in new:
                self.key_of[page] = key
            for page in replaced:
                del self.key_of[page]
            self.blocks.free(replaced)
        self._touch([key for key in keys if key in self.pages_of])

    def _merge(self, old: Entry, mine: Entry) -> tuple[Entry, list[int], list[int]]:
        """A kept entry updated with a row's pages of the same key: the row's page wherever it holds
        one (not a hole, not kept under another key), else the kept one. Returns the entry, the
        row's pages it takes and the kept pages it gives back."""
        hole, merged, new, replaced = self.blocks.num_pages, [], [], []
        for kept_pages, row_pages in zip(old, mine):
            pages = []
            for kept, page in zip(kept_pages, row_pages):
                if page == hole or page == kept or page in self.key_of:
                    pages.append(kept)
                    continue
                pages.append(page)
                new.append(page)
                if kept != hole:
                    replaced.append(kept)
            merged.append(tuple(pages))
        return tuple(merged), new, replaced

    def _evictable(self, entry: Entry) -> list[int]:
        """The pages of `entry` nothing but the cache references. A sliding group's window snapshot
        can go while the row that kept it still reads the full group's pages (or part of the window)."""
        ref_counts = self.blocks.ref_counts
        return [page for page in entry_pages(entry, self.blocks.num_pages) if ref_counts[page] == 1]

    def num_evictable(self) -> int:
        """Cached pages nothing but the cache references."""
        ref_counts = self.blocks.ref_counts
        return sum(ref_counts[page] == 1 for page in self.key_of)

    def evict(self, num: int) -> int:
        """Give back at least `num` evictable pages (when there are), least recently used entry first:
        its pages nothing else references become holes (a hit stops before an entry that misses a
        page it needs: `match`), an entry left with none goes."""
        hole, freed = self.blocks.num_pages, 0
        for key in list(self.recency):
            if freed >= num:
                break
            entry = self.pages_of[key]
            pages = self._evictable(entry)
            if not pages:
                continue
            gone = set(pages)
            kept = tuple(tuple(hole if page in gone else page for page in group) for group in entry)
            if entry_pages(kept, hole):
                self.pages_of[key] = kept
                for page in pages:
                    del self.key_of[page]
                self.blocks.free(pages)
            else:
                self._drop(key)
            freed += len(pages)
        self.stats.evictions += freed
        return freed

    def clear(self) -> None:
        """Forget every cached page; pages nothing else holds return to the pool."""
        for key in list(self.recency):
            self._drop(key)
        self.weights_key = None

    def check_weights(self, weights_key: object) -> None:
        """Empty the cache if the model changed since its pages were computed (model_state.model_state_key)."""
        if weights_key != self.weights_key:
            if self.pages_of:
                self.clear()
            self.weights_key = weights_key

    def _drop(self, key: bytes) -> None:
        pages = entry_pages(self.pages_of.pop(key), self.blocks.num_pages)
        for page in pages:
            del self.key_of[page]
        del self.recency[key]
        self.blocks.free(pages)

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first page of a chain ends up most recently used
            self.recency[key] = None
            self.recency.move_to_end(key)
