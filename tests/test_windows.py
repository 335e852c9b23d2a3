"""Sliding-window groups: windowed layers release the pages no later query can see, with stock's tokens.

Windows here are small (5 to 8 tokens, pages of 2 to 4) so that prompts, beams and assisted
decoding all cross them many times.
"""

import copy
from dataclasses import replace

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import hf_paged
from hf_paged import PagedCache, _compat
from hf_paged.memory.groups import window_page_size
from hf_paged.memory.reservations import num_pages_for

import tiny
from tiny import BASIC_MODES as MODES
from tiny import COMMON, padded_prompts, tiny_model

WINDOW = 8


def gemma3_style(seed: int = 0) -> torch.nn.Module:
    """5 sliding layers (window 8) : 1 full layer, as Gemma 3."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=WINDOW, **COMMON,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def generate(model, input_ids, mask, seed=3, max_new_tokens=16, **kwargs):
    kwargs.setdefault("min_new_tokens", max_new_tokens)
    return tiny.generate(model, input_ids, mask, seed=seed, max_new_tokens=max_new_tokens, **kwargs)


def test_groups_follow_the_config():
    model = hf_paged.wrap(gemma3_style(), num_pages=64, page_size=4)
    groups = model.hf_paged_runtime.groups
    assert [(g.window, g.layers, g.page_size) for g in groups] == [(None, (5,), 4), (WINDOW, (0, 1, 2, 3, 4), 1)]
    pools = model.hf_paged_runtime.pool.pools
    assert [pool.shape[2] for pool in pools] == [1, 1, 1, 1, 1, 4]  # each layer's pages have its group's size
    mistral = hf_paged.wrap(tiny_model("mistral"), num_pages=64)
    assert [(g.window, g.layers) for g in mistral.hf_paged_runtime.groups] == [(5, (0, 1))]
    llama = hf_paged.wrap(tiny_model("llama"), num_pages=64)
    assert [(g.window, g.layers, g.page_size) for g in llama.hf_paged_runtime.groups] == [(None, (0, 1), 16)]
    compiled = hf_paged.wrap(gemma3_style(), num_pages=64, compile=True)  # one metadata for every layer
    assert [(g.window, g.page_size) for g in compiled.hf_paged_runtime.groups] == [(None, 16)]
    chosen = hf_paged.wrap(gemma3_style(), num_pages=64, page_size=4, window_page_size=2)
    assert [g.page_size for g in chosen.hf_paged_runtime.groups] == [4, 2]


def test_sliding_groups_take_pages_of_about_a_32nd_of_their_window_dividing_page_size():
    assert [window_page_size(w, 16) for w in (8, 64, 128, 256, 512, 4096)] == [1, 2, 4, 8, 16, 16]
    assert [window_page_size(w, 12) for w in (128, 256, 1024)] == [4, 6, 12]  # divisors of 12 only
    assert window_page_size(128, 16, requested=16) == 16
    for bad in (3, 0, 32, 2.0):
        with pytest.raises(ValueError, match="window_page_size"):
            hf_paged.PagedConfig(page_size=16, window_page_size=bad)


@pytest.mark.parametrize("page_size, window_pages", [(2, None), (4, None), (4, 2), (4, 4)])
def test_long_prompts_and_beams_past_the_window_match_stock_and_release_pages(page_size, window_pages):
    model = gemma3_style()
    input_ids, mask = padded_prompts(batch=3, length=29, pads=(0, 6, 13))
    expected = {mode: generate(model, input_ids, mask, **kw) for mode, kw in MODES.items()}
    hf_paged.wrap(model, num_pages=512, page_size=page_size, window_page_size=window_pages)
    for mode, kw in MODES.items():
        assert torch.equal(generate(model, input_ids, mask, **kw), expected[mode]), mode
        stats = hf_paged.memory_stats(model)
        full, sliding = stats["groups"]
        assert (full["page_size"], sliding["page_size"]) == (page_size, window_pages or 1)
        rows = 3 * max(kw.get("num_beams", 1), kw.get("num_return_sequences", 1))
        # A sliding row holds its window (WINDOW - 1 past tokens and the new one) plus partial pages.
        assert sliding["peak_pages_in_use"] <= rows * (num_pages_for(WINDOW, sliding["page_size"]) + 1), (mode, stats)
        assert full["peak_pages_in_use"] >= num_pages_for(29 + 15 - 6, page_size)
        assert stats["pages_in_use"] == 0


def stock_kv_bytes(model, input_ids, mask, **kwargs) -> int:
    """The most bytes stock's DynamicCache (window-only on sliding layers) holds during generate()."""
    peak = 0

    def hook(module, args, output):
        nonlocal peak
        cache = _compat.output_cache(output)
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
        peak = max(peak, held)

    handle = model.register_forward_hook(hook)
    try:
        generate(model, input_ids, mask, **kwargs)
    finally:
        handle.remove()
    return peak


def test_greedy_kv_stays_at_stocks_window_only_cache_plus_a_page_per_row_and_group():
    model = gemma3_style()
    input_ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    stock = stock_kv_bytes(model, input_ids, None, max_new_tokens=8)
    hf_paged.wrap(model, num_pages=256, page_size=4)
    generate(model, input_ids, None, max_new_tokens=8)
    stats = hf_paged.memory_stats(model)
    # Paging rounds at both ends of a window (the first page it still needs, the last one it fills):
    # at most two pages per row for a sliding group, one for the full group.
    page_slack = sum(2 * (2 if group["window"] else 1) * group["page_bytes"] for group in stats["groups"])
    assert stats["peak_kv_bytes"] <= stock + page_slack, (stats["peak_kv_bytes"], stock)
    unwindowed = (40 + 8) * 2 * 6 * 2 * 2 * 16 * 4  # every token of every layer: what was held before groups
    assert stats["peak_kv_bytes"] < unwindowed / 2


def held_after_each_forward(model, input_ids, mask, **kwargs) -> list[list[int]]:
    """Per forward of a wrapped generate(), the page ids each group's rows hold once it ends,
    counted here from the page tables (holes left out, a page shared by rows once)."""
    counts = []

    def hook(module, args, output):
        cache = _compat.output_cache(output)
        counts.append([
            len({page for table in tables.page_tables for page in table if page != tables.hole})
            for tables in cache.group_tables
        ])

    handle = model.register_forward_hook(hook)
    try:
        generate(model, input_ids, mask, **kwargs)
    finally:
        handle.remove()
    return counts


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_windowed_peaks_are_exactly_what_the_rows_hold_after_a_forward(mode):
    """Exact peaks, not bounds: with sliding pages of 1, a row holds `WINDOW - 1` sliding pages after
    each forward (what its next query sees besides itself; a hole is no page), the full group every
    token but the one fed next; `peak_kv_bytes` is the most bytes those pages held after a forward."""
    model = gemma3_style()
    rows, prompt, new = 2, 40, 8
    input_ids = torch.randint(3, 128, (rows, prompt), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=new, **({"num_beams": 2} if mode == "beam" else {}))
    hf_paged.wrap(model, num_pages=256, page_size=4)  # window 8: sliding pages of 1
    counts = held_after_each_forward(model, input_ids, None, **kwargs)
    stats = hf_paged.memory_stats(model)
    full, sliding = stats["groups"]
    assert (full["page_size"], sliding["page_size"]) == (4, 1)
    config = model.config
    token_bytes = 2 * config.num_key_value_heads * config.head_dim * 4  # keys and values, fp32, one layer
    page_bytes = [4 * token_bytes * 1, 1 * token_bytes * 5]  # the full layer's pages of 4, 5 sliding layers' of 1
    assert [full["peak_pages_in_use"], sliding["peak_pages_in_use"]] == [max(c[g] for c in counts) for g in (0, 1)]
    assert stats["peak_kv_bytes"] == max(sum(n * b for n, b in zip(c, page_bytes)) for c in counts)
    if mode == "greedy":  # the last forward feeds token prompt + new - 1: each row holds the tokens before it
        assert sliding["peak_pages_in_use"] == rows * (WINDOW - 1)
        assert full["peak_pages_in_use"] == rows * num_pages_for(prompt + new - 1, 4)
        assert stats["peak_kv_bytes"] == rows * (WINDOW - 1) * page_bytes[1] + full["peak_pages_in_use"] * page_bytes[0]


def test_assisted_decoding_that_crops_across_the_window_matches_stock():
    model = tiny_model("mistral")  # window 5 on every layer
    input_ids = torch.randint(3, 128, (1, 18), generator=torch.Generator().manual_seed(8))
    input_ids[0, 9:14] = input_ids[0, 2:7]
    kwargs = dict(max_new_tokens=20, prompt_lookup_num_tokens=4, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    assistant = tiny_model("mistral", seed=1)
    expected_assisted = model.generate(input_ids, assistant_model=assistant, max_new_tokens=20, pad_token_id=0)
    hf_paged.wrap(model, num_pages=128, page_size=2)
    assert torch.equal(model.generate(input_ids, **kwargs), expected)
    assert torch.equal(model.generate(input_ids, assistant_model=assistant, max_new_tokens=20, pad_token_id=0),
                       expected_assisted)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_crop_back_into_released_pages_raises_and_changes_nothing():
    # Pages of 2: the page of the window's first token still holds the token before it.
    model = hf_paged.wrap(tiny_model("mistral"), num_pages=64, page_size=2, window_page_size=2)
    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with PagedCache(model) as cache, torch.no_grad():
        model(input_ids, **{_compat.model_cache_arg(model): cache})
        model(input_ids[:, :1], **{_compat.model_cache_arg(model): cache})  # releases pages before the window
        tables = [list(t) for t in cache.tables.page_tables]
        used = model.hf_paged_runtime.pool.blocks.num_used_pages
        with pytest.raises(ValueError, match="activate_past_recording"):
            cache.crop(-6)
        assert cache.tables.page_tables == tables and cache.get_seq_length() == 13
        assert model.hf_paged_runtime.pool.blocks.num_used_pages == used
        cache.crop(-1)  # within the window: fine
        assert cache.get_seq_length() == 12


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_window_only_the_cache_keeps_gives_stocks_tokens_or_raises(prefix_cache):
    """Moshi's config names a window (stock's DynamicCache(config) keeps the last 3 tokens) that its
    attention does not apply: stock's prompt sees the whole prompt, each later query the cached 3
    tokens and itself. Prompts and generations longer than the window, every mode, also with the
    prompt split by the prefill helpers (beams, the prefix cache). Assisted decoding past the window
    (several tokens per forward) raises, returning every page."""
    model = tiny_model("moshi")
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 4))
    expected = {mode: generate(model, input_ids, mask, **kw) for mode, kw in MODES.items()}
    hf_paged.wrap(model, num_pages=256, page_size=4, prefix_cache=prefix_cache)
    for call in range(2):  # the second: the group is known as a cache window from the start
        for mode, kw in MODES.items():
            assert torch.equal(generate(model, input_ids, mask, **kw), expected[mode]), (mode, call)
    [group] = model.hf_paged_runtime.groups
    assert (group.window, group.cache_window) == (4, True)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == stats.get("cached_pages", 0)
    repeats = torch.randint(3, 128, (1, 18), generator=torch.Generator().manual_seed(8))
    repeats[0, 9:14] = repeats[0, 2:7]  # prompt lookup finds candidates: forwards of several tokens
    with pytest.raises(RuntimeError, match="tokens per row after more than 3"):
        model.generate(repeats, max_new_tokens=12, prompt_lookup_num_tokens=4, pad_token_id=0)
    assert hf_paged.memory_stats(model)["pages_in_use"] == stats.get("cached_pages", 0)
    with pytest.raises(RuntimeError, match="compile=False"):  # one group keeping every token cannot do it
        hf_paged.wrap(model, num_pages=64, compile=True)
        generate(model, input_ids, mask)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_a_layer_attending_wider_after_its_group_released_pages_raises():
    model = tiny_model("mistral")
    input_ids, mask = padded_prompts()
    hf_paged.wrap(model, num_pages=64, page_size=2, cascade=False)  # window 5
    with PagedCache(model) as cache, torch.no_grad():
        name = _compat.model_cache_arg(model)
        model(input_ids, attention_mask=mask, **{name: cache})  # releases pages before the window
        assert cache.group_tables[0].num_released > 0
        cache.group_tables[0].window = 3
        cache.groups[0] = replace(cache.groups[0], window=3)  # the cache would keep 3, attention reads 5
        step = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        with pytest.raises(RuntimeError, match="released the rest"):
            model(input_ids[:, -1:], attention_mask=step, **{name: cache})


def test_the_user_decode_loop_matches_dynamic_cache_with_its_windows():
    model = gemma3_style()
    input_ids, mask = padded_prompts(batch=2, length=20, pads=(0, 7))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    name = _compat.model_cache_arg(model)

    def decode(cache):
        tokens = []
        with torch.no_grad():
            out = model(input_ids, attention_mask=mask, position_ids=position_ids, **{name: cache})
            attention, positions = mask, position_ids[:, -1:]
            for _ in range(12):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                attention = torch.cat([attention, torch.ones_like(token)], dim=1)
                positions = positions + 1
                out = model(token, attention_mask=attention, position_ids=positions, **{name: cache})
        return torch.cat(tokens, dim=1), out.logits

    expected_tokens, expected_logits = decode(DynamicCache(config=model.config))
    hf_paged.wrap(model, num_pages=64, page_size=2)
    with PagedCache(model) as cache:
        tokens, logits = decode(cache)
        sliding = cache.group_tables[1]
        assert all(table[0] == sliding.hole for table in sliding.page_tables)  # the window has moved on
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_a_copy_or_a_dtype_change_makes_a_pool_with_each_groups_page_size():
    """The pool of a deepcopy (made on first use) and the pool made after `.to(dtype)` keep the
    groups' page sizes, and still give stock's tokens."""
    model = gemma3_style()
    input_ids, mask = padded_prompts(batch=2, length=20, pads=(0, 7))
    expected = generate(model, input_ids, mask, num_beams=3)
    hf_paged.wrap(model, num_pages=256, page_size=4, window_page_size=2)
    twin = copy.deepcopy(model)
    assert torch.equal(generate(twin, input_ids, mask, num_beams=3), expected)
    assert [pool.shape[2] for pool in twin.hf_paged_runtime.pool.pools] == [2, 2, 2, 2, 2, 4]
    model.to(torch.float64)
    stock = gemma3_style().to(torch.float64)
    assert torch.equal(generate(model, input_ids, mask, num_beams=3), generate(stock, input_ids, mask, num_beams=3))
    pools = model.hf_paged_runtime.pool.pools
    assert [(pool.dtype, pool.shape[2]) for pool in pools] == [(torch.float64, 2)] * 5 + [(torch.float64, 4)]
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0


def test_running_out_of_pages_or_an_interrupt_returns_every_groups_pages():
    """A pool the prompt fits but the beams outgrow: OutOfPagesError at the step that runs out, every
    page of both groups back in the pool, and the next calls give stock's tokens; the same after a
    KeyboardInterrupt from a stopping criterion."""
    from transformers import StoppingCriteriaList

    from hf_paged import OutOfPagesError
    from tiny import Interrupt

    model = gemma3_style()
    input_ids, mask = padded_prompts(batch=1, length=20, pads=(0,))
    expected = generate(model, input_ids, mask, max_new_tokens=4, num_beams=4)
    hf_paged.wrap(model, num_pages=24, page_size=4, window_page_size=2)
    blocks = model.hf_paged_runtime.pool.blocks
    with pytest.raises(OutOfPagesError):  # prompt: 5 full + 10 sliding pages; 4 beams of 30 tokens outgrow 24
        generate(model, input_ids, mask, max_new_tokens=30, num_beams=4)
    assert blocks.num_used_pages == 0 and blocks.num_shared_pages == 0
    assert torch.equal(generate(model, input_ids, mask, max_new_tokens=4, num_beams=4), expected)
    with pytest.raises(KeyboardInterrupt):
        generate(model, input_ids, mask, max_new_tokens=4, num_beams=4,
                 stopping_criteria=StoppingCriteriaList([Interrupt(at=2)]))
    assert blocks.num_used_pages == 0 and blocks.num_shared_pages == 0
    assert all(count == 0 for count in blocks.ref_counts) and blocks.num_reserved == 0
    assert torch.equal(generate(model, input_ids, mask, max_new_tokens=4, num_beams=4), expected)


def test_the_metadata_of_a_sliding_group_starts_each_row_at_its_first_held_page():
    """Released pages are left out of the metadata: each row's keys start at its first held page
    (positions are relative to the query's), so no executor reads a released entry."""
    from hf_paged.memory.blocks import BlockManager
    from hf_paged.attention.metadata import build_metadata
    from hf_paged.memory.tables import PageTables

    tables = PageTables(BlockManager(64), page_size=2, window=5)
    tables.add_rows(2)
    tables.append([12, 7])
    tables.drop_out_of_window()  # next queries at 12 and 7 see keys from 8 and 3 on
    assert tables.num_leading_holes == [4, 1]
    slots, copies = tables.append([1, 1])
    meta = build_metadata(tables, [1, 1], 1, slots, copies, None, torch.device("cpu"))
    assert meta.kv_lens == [13 - 8, 8 - 2]
    assert meta.kv_indices_host == tables.page_tables[0][4:] + tables.page_tables[1][1:]
    assert tables.hole not in meta.kv_indices_host and meta.kv_indptr_host == [0, 3, 6]
    tables.select_rows([1, 1, 0])  # beams: rows carry their holes
    assert tables.num_leading_holes == [1, 1, 4]
    tables.release()
    assert tables.blocks.num_used_pages == 0
