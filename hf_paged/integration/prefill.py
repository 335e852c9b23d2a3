"""Prefill a prompt batch on top of the pages the prefix cache already holds.

Each row's real tokens (pads are never stored nor part of a key) are looked up in the pool's
PrefixCache; the row's page table starts with the pages found (references, no copy), and a
forward computes every row's remainder, the last prompt token excluded (generate() feeds it, as
after `generate.prefill_prompt`). The rows' full prompt pages are then kept for later calls.

A model with sliding-window layers keeps only their window (inflight.py), so a row's prefill
stops, one forward more each, where a later prompt may reuse what came before (`_stops`): the
window before that point is then in the pages when they are kept (a window snapshot).
"""

import inspect

import torch

from .. import _compat
from ..cache import inflight
from ..cache.paged_cache import PagedCache
from ..memory.prefix_cache import Entry, PrefixCache, page_keys


def forward_parameters(model: torch.nn.Module) -> dict:
    """The parameters of the forward that receives `model(**inputs)`'s keywords.

    A PEFT model's forward takes `**kwargs` and hands them to its base model's forward, which names
    `position_ids` and `logits_to_keep`; reading only the wrapper's signature would find neither
    (the prefix cache never ran under PEFT). A PEFT prompt-learning model builds its own cache and
    positions: its own signature is kept, so that the prefix cache is not used there.
    """
    parameters = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    base = getattr(model, "get_base_model", None)
    config = getattr(model, "active_peft_config", None)
    if takes_kwargs and callable(base) and not getattr(config, "is_prompt_learning", False):
        inner = base()
        if inner is not model:
            return forward_parameters(inner)
    return dict(parameters)


def can_use_prefix_cache(model: torch.nn.Module, attention_mask: torch.Tensor | None) -> bool:
    """Positions can be given explicitly (or the model has none but its attention's, which the
    paged attention takes from the stored tokens) and the mask is left padding only (no holes)."""
    if "position_ids" not in forward_parameters(model) and not positions_from_stored_tokens(model):
        return False
    if attention_mask is None:
        return True
    mask = attention_mask.bool()
    # Left padding: once a row has a token, every later column is a token too.
    return bool((mask.cummax(dim=1).values == mask).all())


def positions_from_stored_tokens(model: torch.nn.Module) -> bool:
    """Whether the model's only positions are its attention's, counted over each row's stored tokens
    (ALiBi: Bloom), declared by its patch (hf_paged.patches): its forward takes no `position_ids`
    and needs none to continue a row from cached pages."""
    runtime = getattr(model, "hf_paged_runtime", None)
    return bool(getattr(getattr(runtime, "patch", None), "POSITIONS_FROM_STORED_TOKENS", False))


@torch.no_grad()
def prefill_with_prefix_cache(
    model: torch.nn.Module,
    cache: PagedCache,
    prefix_cache: PrefixCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> None:
    """Store the K/V of `input_ids [batch, length]` minus the last column in the (empty) `cache`.

    Rows of the batch that start with the same pages none of the cache holds yet (the first batch
    of a few-shot run) compute them once: one row per such shared prefix first, up to where it
    ends, then the others adopt its pages and compute only their own rest. Afterwards
    `cache.get_seq_length() == length - 1`, as generate() expects.

    Sliding-window groups store only each row's window, also here (inflight.py): a forward stops
    where a later prompt may reuse the entries up to (`_stops`), so that the window before that
    point is in the pages when they are kept (the prefix cache's window snapshots).
    """
    batch, length = input_ids.shape
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    rows = [input_ids[row][mask[row]].tolist() for row in range(batch)]
    page_size = prefix_cache.page_size  # tokens per key (a group's pages may be smaller: groups.py)
    groups = _group_windows(cache)
    # Other calls on the pool may evict cached pages to make room: find and adopt them atomically.
    with cache.pool.blocks.lock:
        hits = [prefix_cache.match(tokens, groups=groups) for tokens in rows]
        chained = [prefix_cache.num_chained(tokens) for tokens in rows]
        cache.add_rows(batch)
        if not any(hits):  # nothing to reuse: consecutive pages, read in place, as without the cache
            cache.reserve_rows()
        for row, entries in enumerate(hits):  # an entry holds the page of every group
            cache.adopt(row, _by_group(entries, len(cache.groups)), len(entries) * page_size)
    done = [len(pages) * page_size for pages in hits]
    windowed = any(window is not None for window, _ in groups)
    stops = [_stops(tokens, skip, chain * page_size, page_size, windowed) for tokens, skip, chain in zip(rows, done, chained)]
    if windowed and not _has_room_for_stops(cache, groups, rows, done, stops):
        stops = [[len(tokens) - 1] for tokens in rows]  # one forward each, as without the prefix cache
    cache.prompt_phase = "prefill"
    while True:  # rows sharing their next missing page: one computes it (and what else they share)
        leaders = _leaders(rows, done, page_size)
        if not leaders:
            break
        _advance(model, cache, prefix_cache, input_ids, rows, done, stops, leaders)
        with cache.pool.blocks.lock:
            for row in range(batch):
                if row not in leaders:
                    more = prefix_cache.match(rows[row], first_page=done[row] // page_size, groups=groups)
                    if more:
                        cache.extend(row, _by_group(more, len(cache.groups)), len(more) * page_size)
                        done[row] += len(more) * page_size
    _advance(model, cache, prefix_cache, input_ids, rows, done, stops, {row: len(tokens) - 1 for row, tokens in enumerate(rows)})
    cache.prompt_phase = "last"  # generate() feeds the last token next (PagedCache.prompt_phase)
    cache.seq_length = length - 1


def _group_windows(cache: PagedCache) -> list[tuple[int | None, int]]:
    """(window, page size) of each group for PrefixCache.match: a window only where the group keeps
    only its window through a prompt (not one the layers attend wider than: GroupSpec.cache_window)."""
    return [(None if spec.cache_window else spec.window, spec.page_size) for spec in cache.groups]


def _stops(tokens: list[int], done: int, chained: int, page_size: int, windowed: bool) -> list[int]:
    """Where a row's prefill stops between forwards, past `done`: with sliding groups, at its last
    full key (whose window snapshot a later prompt with the same start reuses) and where the cached
    chain it matched ends (`chained` tokens: another prompt went on differently there), then at
    its end (its tokens but the last)."""
    end = len(tokens) - 1
    points = {end}
    if windowed:
        points |= {end // page_size * page_size, chained}
    return sorted(point for point in points if done < point <= end)


def _has_room_for_stops(
    cache: PagedCache, groups: list[tuple[int | None, int]], rows: list[list[int]], done: list[int], stops: list[list[int]]
) -> bool:
    """Whether the pool has room (free or evictable pages) for the window snapshots `stops` leave.

    A forward that continues after a stop holds the window before it (which its first queries
    read) next to what it stores, so a sliding group holds up to `window - 1` more tokens than a
    prompt computed in one forward (up to a key less for the last stop): the snapshot a later
    prompt reuses. Where the pool is too short for that, the rows compute in one forward each, as
    without the prefix cache, and leave no snapshot but at their end.
    """
    counts = [len(tokens) - 1 - skip for tokens, skip in zip(rows, done)]
    need = 0
    for (window, size), tables in zip(groups, cache.group_tables):
        skip = None if window is None else inflight.skipped_tokens(counts, window, size, tables.num_tokens)
        need += tables.num_pages_to_append(counts, skip)
        if window is not None:
            def pages(num_tokens: int) -> int:  # a window's pages, the partly used one at each end included
                return -(-min(window - 1, num_tokens) // size) + 1 if num_tokens > 0 else 0

            for skip, row_stops in zip(done, stops):
                points = [skip] + row_stops
                held = [pages(a) + pages(b - a) for a, b in zip(points, points[1:])]  # in each forward
                need += max(held, default=0) - (pages(skip) + pages(points[-1] - skip))
    return cache.pool.blocks.can_allocate(need)


def _advance(
    model: torch.nn.Module, cache: PagedCache, prefix_cache: PrefixCache, input_ids: torch.Tensor,
    rows: list[list[int]], done: list[int], stops: list[list[int]], targets: dict[int, int],
) -> None:
    """Compute the rows of `targets` up to their target, one forward per stop on the way (a row
    goes to its next stop in each), keeping their full pages after each."""
    while True:
        step = {
            row: min([stop for stop in stops[row] if done[row] < stop < target] + [target])
            for row, target in targets.items() if done[row] < target
        }
        if not step:
            return
        _compute(model, cache, input_ids, rows, done, step)
        _keep(cache, prefix_cache, rows, done, set(step))


def _by_group(entries: list[Entry], num_groups: int) -> list[list[int]]:
    """Cache entries (pages per group) as one page list per group."""
    return [[page for entry in entries for page in entry[group]] for group in range(num_groups)]


def _leaders(rows: list[list[int]], done: list[int], page_size: int) -> dict[int, int]:
    """One row per group of rows whose first page still to compute is the same (same tokens and
    everything before them), with the tokens all of its group share (whole pages, before each
    one's last token); empty when no two rows share such a page (one forward does it all)."""
    first_missing: dict[bytes, list[int]] = {}
    for row, (tokens, skip) in enumerate(zip(rows, done)):
        index = skip // page_size
        if (len(tokens) - 1) // page_size > index:  # a full page before the last token is still missing
            key = page_keys(tokens, page_size, index + 1)[-1]
            first_missing.setdefault(key, []).append(row)
    leaders = {}
    for members in first_missing.values():
        if len(members) > 1:
            lead = rows[members[0]][:-1]
            shared = min(_common_length(lead, rows[other][:-1]) for other in members[1:])
            leaders[members[0]] = shared // page_size * page_size
    return leaders


def _common_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def _compute(
    model: torch.nn.Module, cache: PagedCache, input_ids: torch.Tensor, rows: list[list[int]], done: list[int],
    targets: dict[int, int],
) -> None:
    """One forward computing, for each row in `targets`, its tokens from `done[row]` up to
    `targets[row]` (excluded); `done` is updated. Other rows take part with no new token."""
    batch = input_ids.shape[0]
    counts = [targets[row] - skip if row in targets else 0 for row, skip in enumerate(done)]
    width = max(counts)
    if width <= 0:
        return
    cache.seq_length = max(0, input_ids.shape[1] - 1 - width)  # the padded past transformers sees
    ids = torch.zeros(batch, width, dtype=input_ids.dtype, device=input_ids.device)
    new = torch.zeros(batch, width, dtype=torch.long, device=input_ids.device)
    positions = torch.zeros_like(new)
    for row, (tokens, skip, count) in enumerate(zip(rows, done, counts)):
        if count:
            ids[row, width - count :] = torch.tensor(tokens[skip : skip + count], dtype=ids.dtype)
            new[row, width - count :] = 1
            positions[row, width - count :] = torch.arange(skip, skip + count)
            done[row] += count
    # Only the new columns are read (the paged attention knows each row's past from its pages).
    past = torch.ones(batch, cache.seq_length, dtype=torch.long, device=input_ids.device)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.cat([past, new], dim=1),
        _compat.model_cache_arg(model): cache,
        "use_cache": True,
    }
    parameters = forward_parameters(model)
    if "position_ids" in parameters:
        inputs["position_ids"] = positions
    if "logits_to_keep" in parameters:
        inputs["logits_to_keep"] = 1
    cache.ragged_prefill = True
    try:
        model(**inputs)
    finally:
        cache.ragged_prefill = False


def _keep(cache: PagedCache, prefix_cache: PrefixCache, rows: list[list[int]], done: list[int], which: set[int]) -> None:
    """Put the full pages of the rows in `which` (their first `done[row]` tokens) into the prefix cache."""
    with cache.pool.blocks.lock:
        for row in sorted(which):
            prefix_cache.insert(
                rows[row][: done[row]],
                [tables.page_tables[row] for tables in cache.group_tables],
                [tables.page_size for tables in cache.group_tables],
            )
