"""Prefill a prompt batch on top of the pages the prefix cache already holds.

Each row's real tokens (pads are never stored nor part of a key) are looked up in the pool's
PrefixCache; the row's page table starts with the pages found (references, no copy), and one
forward computes every row's remainder, the last prompt token excluded (generate() feeds it, as
after `generate.prefill_prompt`). The rows' full prompt pages are then kept for later calls.
"""

import inspect

import torch

from . import _compat
from .cache import PagedCache
from .prefix_cache import Entry, PrefixCache, page_keys


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
    """Positions can be given explicitly and the mask is left padding only (no holes)."""
    if "position_ids" not in forward_parameters(model):
        return False
    if attention_mask is None:
        return True
    mask = attention_mask.bool()
    # Left padding: once a row has a token, every later column is a token too.
    return bool((mask.cummax(dim=1).values == mask).all())


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
    of a few-shot run) compute them once: one row per such shared page first, then the others adopt
    its pages and compute only their own rest. Afterwards `cache.get_seq_length() == length - 1`,
    as generate() expects.
    """
    batch, length = input_ids.shape
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    rows = [input_ids[row][mask[row]].tolist() for row in range(batch)]
    page_size = prefix_cache.page_size  # tokens per key (a group's pages may be smaller: groups.py)
    # Other calls on the pool may evict cached pages to make room: find and adopt them atomically.
    with cache.pool.blocks.lock:
        hits = [prefix_cache.match(tokens) for tokens in rows]
        cache.add_rows(batch)
        if not any(hits):  # nothing to reuse: consecutive pages, read in place, as without the cache
            cache.reserve_rows()
        for row, entries in enumerate(hits):  # an entry holds the page of every group
            cache.adopt(row, _by_group(entries, len(cache.groups)), len(entries) * page_size)
    done = [len(pages) * page_size for pages in hits]
    # Sliding-window groups keep every prompt page until they are in the prefix cache (an entry
    # needs the page of every group); they let go of what they cannot see at the next forward.
    cache.recording = True
    cache.prompt_phase = "prefill"
    try:
        leaders = _leaders(rows, done, page_size)
        if leaders:
            _compute(model, cache, input_ids, rows, done, leaders)
            _keep(cache, prefix_cache, rows, leaders)
            with cache.pool.blocks.lock:
                for row in range(batch):
                    more = prefix_cache.match(rows[row], first_page=done[row] // page_size) if row not in leaders else []
                    if more:
                        cache.extend(row, _by_group(more, len(cache.groups)), len(more) * page_size)
                        done[row] += len(more) * page_size
        _compute(model, cache, input_ids, rows, done, set(range(batch)))
        _keep(cache, prefix_cache, rows, set(range(batch)))
    finally:
        cache.recording = False
    cache.prompt_phase = "last"  # generate() feeds the last token next (PagedCache.prompt_phase)
    cache.seq_length = length - 1


def _by_group(entries: list[Entry], num_groups: int) -> list[list[int]]:
    """Cache entries (pages per group) as one page list per group."""
    return [[page for entry in entries for page in entry[group]] for group in range(num_groups)]


def _leaders(rows: list[list[int]], done: list[int], page_size: int) -> set[int]:
    """One row per group of rows whose first page still to compute is the same (same tokens and
    everything before them); empty when no two rows share such a page (one forward does it all)."""
    first_missing: dict[bytes, list[int]] = {}
    for row, (tokens, skip) in enumerate(zip(rows, done)):
        index = skip // page_size
        if (len(tokens) - 1) // page_size > index:  # a full page before the last token is still missing
            key = page_keys(tokens, page_size, index + 1)[-1]
            first_missing.setdefault(key, []).append(row)
    groups = [members for members in first_missing.values() if len(members) > 1]
    return {members[0] for members in groups}


def _compute(
    model: torch.nn.Module, cache: PagedCache, input_ids: torch.Tensor, rows: list[list[int]], done: list[int],
    which: set[int],
) -> None:
    """One forward computing, for the rows in `which`, their tokens from `done[row]` up to the last
    (excluded); `done` is updated. Other rows take part with no new token."""
    batch = input_ids.shape[0]
    counts = [len(tokens) - 1 - skip if row in which else 0 for row, (tokens, skip) in enumerate(zip(rows, done))]
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
        "position_ids": positions,
        _compat.model_cache_arg(model): cache,
        "use_cache": True,
    }
    if "logits_to_keep" in forward_parameters(model):
        inputs["logits_to_keep"] = 1
    cache.ragged_prefill = True
    try:
        model(**inputs)
    finally:
        cache.ragged_prefill = False


def _keep(cache: PagedCache, prefix_cache: PrefixCache, rows: list[list[int]], which: set[int]) -> None:
    """Put the full prompt pages of the rows in `which` into the prefix cache."""
    with cache.pool.blocks.lock:
        for row in sorted(which):
            prefix_cache.insert(
                rows[row][:-1],
                [tables.page_tables[row] for tables in cache.group_tables],
                [tables.page_size for tables in cache.group_tables],
            )
