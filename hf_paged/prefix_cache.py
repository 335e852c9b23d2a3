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


class PrefixCache:
    """Full prompt pages by chain key, one reference each, evicted least recently used first."""

    def __init__(self, blocks: BlockManager, page_size: int):
        self.blocks = blocks
        self.page_size = page_size
        self.page_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.recency: OrderedDict[int, None] = OrderedDict()  # cached pages, least recently used first
        self.stats = PrefixCacheStats()
        self.weights_key: object = None  # what the cached K/V were computed with (see check_weights)
        blocks.evictor = self

    @property
    def num_cached_pages(self) -> int:
        return len(self.key_of)

    def match(self, tokens: list[int]) -> list[int]:
        """Cached pages holding the longest page-aligned prefix of `tokens` that stops before its last token.

        The caller takes its own references to them (`blocks.fork`). The last token is never
        covered: generate() feeds it, so the remainder to compute is never empty.
        """
        num_pages = (len(tokens) - 1) // self.page_size if tokens else 0
        pages: list[int] = []
        for key in page_keys(tokens, self.page_size, num_pages):
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
        self._touch(pages)
        self.stats.lookups += 1
        self.stats.lookup_tokens += num_pages * self.page_size
        self.stats.hits += len(pages)
        self.stats.hit_tokens += len(pages) * self.page_size
        return pages

    def insert(self, tokens: list[int], page_table: list[int]) -> None:
        """Keep the full pages of `page_table` that hold `tokens` (a row's real prompt tokens, in order)."""
        num_pages = min(len(tokens) // self.page_size, len(page_table))
        for key, page in zip(page_keys(tokens, self.page_size, num_pages), page_table):
            if key in self.page_of or page in self.key_of:
                continue  # already kept (by key, or this very page under its key)
            self.blocks.fork([page])
            self.page_of[key] = page
            self.key_of[page] = key
        self._touch(page_table[:num_pages])

    def num_evictable(self) -> int:
        """Cached pages nothing but the cache references."""
        ref_counts = self.blocks.ref_counts
        return sum(1 for page in self.key_of if ref_counts[page] == 1)

    def evict(self, num: int) -> int:
        """Give back up to `num` evictable pages to the pool, least recently used first; returns how many."""
        ref_counts = self.blocks.ref_counts
        victims = []
        for page in self.recency:
            if len(victims) == num:
                break
            if ref_counts[page] == 1:
                victims.append(page)
        for page in victims:
            self._drop(page)
        self.stats.evictions += len(victims)
        return len(victims)

    def clear(self) -> None:
        """Forget every cached page; pages nothing else holds return to the pool."""
        for page in list(self.recency):
            self._drop(page)
        self.weights_key = None

    def check_weights(self, weights_key: object) -> None:
        """Empty the cache if the model's weights changed since its pages were computed."""
        if weights_key != self.weights_key:
            if self.key_of:
                self.clear()
            self.weights_key = weights_key

    def _drop(self, page: int) -> None:
        del self.page_of[self.key_of.pop(page)]
        del self.recency[page]
        self.blocks.free([page])

    def _touch(self, pages: list[int]) -> None:
        for page in reversed(pages):  # the first page of a chain ends up most recently used
            if page in self.key_of:
                self.recency[page] = None
                self.recency.move_to_end(page)
