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


def entry_pages(entry: Entry) -> list[int]:
    return [page for pages in entry for page in pages]


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

    def match(self, tokens: list[int], first_page: int = 0) -> list[Entry]:
        """Cached entries (pages per group) holding the longest page-aligned prefix of `tokens` that
        stops before its last token, from page `first_page` on (the caller holds the pages before).

        The caller takes its own references to them. The last token is never covered: generate()
        feeds it, so the remainder to compute is never empty.
        """
        num_pages = (len(tokens) - 1) // self.page_size if tokens else 0
        entries: list[Entry] = []
        keys: list[bytes] = []
        for key in page_keys(tokens, self.page_size, num_pages)[first_page:]:
            pages = self.pages_of.get(key)
            if pages is None:
                break
            entries.append(pages)
            keys.append(key)
        self._touch(keys)
        if first_page == 0:  # a second look for the same prompt looks up nothing new
            self.stats.lookups += 1
            self.stats.lookup_tokens += num_pages * self.page_size
        self.stats.hits += len(entries)
        self.stats.hit_tokens += len(entries) * self.page_size
        return entries

    def insert(self, tokens: list[int], group_tables: list[list[int]], group_page_sizes: list[int] | None = None) -> None:
        """Keep the full pages that hold `tokens` (a row's real prompt tokens, in order); `group_tables`
        is the row's page table in each group, whose pages hold `group_page_sizes` tokens (default:
        `page_size`, which they must divide). A page a window has released is not kept."""
        sizes = group_page_sizes or [self.page_size] * len(group_tables)
        per_key = [self.page_size // size for size in sizes]  # a group's pages per key
        num_pages = min([len(tokens) // self.page_size] + [len(table) // n for table, n in zip(group_tables, per_key)])
        hole = self.blocks.num_pages
        keys = page_keys(tokens, self.page_size, num_pages)
        for index, key in enumerate(keys):
            entry = tuple(tuple(table[index * n : (index + 1) * n]) for table, n in zip(group_tables, per_key))
            pages = entry_pages(entry)
            if key in self.pages_of or hole in pages or any(page in self.key_of for page in pages):
                continue  # already kept, released by a window, or kept under another key
            self.blocks.fork(pages)
            self.pages_of[key] = entry
            for page in pages:
                self.key_of[page] = key
        self._touch([key for key in keys if key in self.pages_of])

    def _evictable(self, entry: Entry) -> bool:
        ref_counts = self.blocks.ref_counts
        return all(ref_counts[page] == 1 for pages in entry for page in pages)

    def num_evictable(self) -> int:
        """Cached pages nothing but the cache references."""
        return sum(len(entry_pages(entry)) for entry in self.pages_of.values() if self._evictable(entry))

    def evict(self, num: int) -> int:
        """Give back at least `num` evictable pages (when there are), least recently used first."""
        victims, freed = [], 0
        for key in self.recency:
            if freed >= num:
                break
            entry = self.pages_of[key]
            if self._evictable(entry):
                victims.append(key)
                freed += len(entry_pages(entry))
        for key in victims:
            self._drop(key)
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
        pages = entry_pages(self.pages_of.pop(key))
        for page in pages:
            del self.key_of[page]
        del self.recency[key]
        self.blocks.free(pages)

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first page of a chain ends up most recently used
            self.recency[key] = None
            self.recency.move_to_end(key)
