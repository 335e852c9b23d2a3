"""Shared prefixes: which rows attend a common prefix once per group, and when that pays.

Both executors' cascade paths ask this module (a leaf: it reads only the metadata's host lists,
never device memory). Rows whose page tables begin with the same pages (beams after the prompt
fork, samples of one prompt) form a group. A prefix is only taken from pages every row of the
group holds in full and that end before the row's first new token, so every query sees the whole
prefix (no mask) and its own suffix is never empty. Sliding-window layers keep the plain path.
"""

import torch

from .metadata import ForwardMetadata, cumsum, to_device
from .params import LayerParams

# Cascade pays once the rows skip gathering a fair share of their keys; below that, the
# second attention call and the merge cost more than the gather they save.
MIN_SAVED_FRACTION = 0.25

Groups = list[tuple[list[int], int]]  # (member rows, prefix pages) per group


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a[:limit]` and `b[:limit]` (slice compares run in C)."""
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


def find_groups(meta: ForwardMetadata) -> Groups:
    """Groups of >= 2 rows sharing a page-aligned prefix: (member rows, prefix pages) each.

    O(rows) plus C-level list compares; reads only the host lists of `meta`.
    """
    indptr, indices, page_size = meta.kv_indptr_host, meta.kv_indices_host, meta.page_size
    by_first: dict[int, list[int]] = {}
    for row in range(meta.num_rows):
        if indptr[row + 1] > indptr[row]:
            by_first.setdefault(indices[indptr[row]], []).append(row)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        first = members[0]
        head = indices[indptr[first]:indptr[first + 1]]
        limit = len(head)
        for row in members:
            num_pages = indptr[row + 1] - indptr[row]
            past = meta.kv_lens[row] - meta.qo_lens[row]
            # Full pages only, all before the first new token; the last page stays in the suffix.
            limit = min(limit, num_pages - 1, past // page_size)
        for row in members[1:]:
            if limit <= 0:
                break
            limit = common_prefix(head, indices[indptr[row]:indptr[row + 1]], limit)
        if limit > 0:
            groups.append((members, limit))
    return groups


def worth_it(meta: ForwardMetadata, groups: Groups) -> bool:
    """Whether attending `groups`' prefixes once per group skips at least MIN_SAVED_FRACTION of
    the keys the forward reads."""
    saved = sum((len(members) - 1) * pages * meta.page_size for members, pages in groups)
    return bool(groups) and saved >= MIN_SAVED_FRACTION * sum(meta.kv_lens)


def shared_groups(meta: ForwardMetadata, params: LayerParams) -> Groups | None:
    """The groups a cascade plan of this forward and layer setting uses, or None when the plain
    path is the better (or only) one: cascade off, no host page lists, a sliding window, no group
    or too few keys saved."""
    if not meta.cascade or meta.kv_indices_host is None or params.window_left >= 0:
        return None
    groups = find_groups(meta)
    return groups if worth_it(meta, groups) else None


def prefix_pages(num_rows: int, groups: Groups) -> list[int]:
    """Per row, the pages its group's prefix takes (0 outside any group)."""
    pages_of = [0] * num_rows
    for members, pages in groups:
        for row in members:
            pages_of[row] = pages
    return pages_of


def suffix_metadata(meta: ForwardMetadata, prefix_pages: list[int]) -> ForwardMetadata:
    """`meta` with each row's first `prefix_pages[row]` pages (and their tokens) taken off."""
    indptr, indices = meta.kv_indptr_host, meta.kv_indices_host
    suffix_indices: list[int] = []
    for row, skip in enumerate(prefix_pages):
        suffix_indices.extend(indices[indptr[row] + skip:indptr[row + 1]])
    suffix_indptr = cumsum(indptr[row + 1] - indptr[row] - skip for row, skip in enumerate(prefix_pages))
    page_size = meta.page_size
    return ForwardMetadata(
        slot_mapping=meta.slot_mapping,
        token_index=meta.token_index,
        copy_src=None,
        copy_dst=None,
        qo_lens=meta.qo_lens,
        kv_lens=[n - skip * page_size for n, skip in zip(meta.kv_lens, prefix_pages)],
        q_len=meta.q_len,
        page_size=page_size,
        device=meta.device,
        group=meta.group,
        made_qo_indptr=meta.qo_indptr,
        made_kv_indptr=to_device(suffix_indptr, torch.int32, meta.device),
        made_kv_indices=to_device(suffix_indices, torch.int32, meta.device),
        made_kv_last_page_len=meta.kv_last_page_len,
    )
