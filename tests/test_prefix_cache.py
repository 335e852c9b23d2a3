"""Prefix caching across generate() calls (PagedConfig(prefix_cache=True)).

Bookkeeping first (exact page ids, reference counts, eviction order), then generate() against
the unwrapped model: every reused page must give stock's tokens, and nothing stale is ever read.
"""

import pytest
import torch

import hf_paged
from hf_paged import OutOfPagesError
from hf_paged.memory.blocks import BlockManager
from hf_paged.memory.prefix_cache import PrefixCache, page_keys
from hf_paged.memory.tables import PageTables

import tiny
from tiny import BASIC_MODES as MODES
from threads import run_threads
from tiny import left_padded, padded_prompts, tiny_model


def test_keys_chain_every_token_before_them():
    tokens = list(range(10, 22))
    keys = page_keys(tokens, 4, 3)
    assert len(set(keys)) == 3
    assert page_keys(tokens[:8], 4, 2) == keys[:2]  # a key depends on its page and the pages before
    changed = tokens[:1] + [99] + tokens[2:]
    assert page_keys(changed, 4, 3)[0] != keys[0] and page_keys(changed, 4, 3)[2] != keys[2]
    moved = [5, 6, 7, 8] + tokens[4:]
    assert page_keys(moved, 4, 3)[1] != keys[1]  # same page tokens, other prefix: another key


def filled_cache(num_pages=8, page_size=2):
    """A PrefixCache holding the 3 full pages of tokens 1..7 (pages 0, 1, 2 of a released row)."""
    blocks = BlockManager(num_pages)
    prefix = PrefixCache(blocks, page_size)
    tables = PageTables(blocks, page_size)
    tables.add_rows(1)
    tables.append([7])
    tokens = [1, 2, 3, 4, 5, 6, 7]
    prefix.insert(tokens[:-1], [tables.page_tables[0]])
    tables.release()
    return blocks, prefix, tokens


def test_insert_holds_one_reference_and_match_stops_before_the_last_token():
    blocks, prefix, tokens = filled_cache()
    assert prefix.num_cached_pages == 3 and blocks.ref_counts[:4] == [1, 1, 1, 0]
    assert prefix.match(tokens) == [((0,),), ((1,),), ((2,),)]  # 6 tokens before the last one: 3 full pages
    assert prefix.match(tokens[:6]) == [((0,),), ((1,),)]  # the page holding the last token is never reused
    assert prefix.match([1, 2, 3, 9, 5, 6, 7]) == [((0,),)]  # a different token ends the match
    assert prefix.match([2, 1, 3, 4, 5]) == []
    assert prefix.stats.hits == 6 and prefix.stats.hit_tokens == 12


def test_eviction_is_least_recently_used_and_tail_first_and_only_unreferenced():
    blocks, prefix, tokens = filled_cache(num_pages=5)
    assert blocks.num_free_pages == 2 and blocks.num_available_pages == 5
    blocks.fork([0])  # a live row holds page 0: never evicted while it does
    assert blocks.allocate(3) == [2, 3, 4]  # two free pages and the cache's tail page 2 (top of the stack)
    assert prefix.stats.evictions == 1 and prefix.num_cached_pages == 2
    assert prefix.match(tokens) == [((0,),), ((1,),)]  # the chain's head is still found
    with pytest.raises(OutOfPagesError, match="needed 2 pages, 1 of 5 free"):
        blocks.allocate(2)  # page 1 is evictable, page 0 is held: nothing changes
    assert prefix.num_cached_pages == 2 and blocks.num_free_pages == 0
    assert blocks.allocate(1) == [1]
    blocks.free([0])
    prefix.clear()
    assert prefix.num_cached_pages == 0 and blocks.free_page_ids == [0]


def generate(model, input_ids, mask, seed=7, max_new_tokens=6, **kwargs):
    return tiny.generate(model, input_ids, mask, seed=seed, max_new_tokens=max_new_tokens, **kwargs)


# GPT-Neo (local layers: a window group), Bloom and MPT (ALiBi, a forward without position_ids:
# their patches declare POSITIONS_FROM_STORED_TOKENS) are served by hf_paged.patches.
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neo", "bloom", "mpt"])
def test_second_calls_hit_every_full_page_and_match_stock(family):
    model = tiny_model(family)
    input_ids, mask = padded_prompts(batch=3, length=23, pads=(0, 5, 10))
    modes = {mode: dict(kw, use_cache=True) for mode, kw in MODES.items()}  # MPT's config says False
    expected = {mode: generate(model, input_ids, mask, **kw) for mode, kw in modes.items()}
    hf_paged.wrap(model, num_pages=256, page_size=4, prefix_cache=True)
    real = mask.sum(dim=1).tolist()
    full_pages = sum((n - 1) // 4 for n in real)
    for call in range(2):
        for mode, kw in modes.items():
            before = hf_paged.memory_stats(model)["prefix_hits"]
            assert torch.equal(generate(model, input_ids, mask, **kw), expected[mode]), (family, mode, call)
            hits = hf_paged.memory_stats(model)["prefix_hits"] - before
            assert hits == (0 if call == 0 and mode == "greedy" else full_pages), (mode, call)
    stats = hf_paged.memory_stats(model)
    # Per key, the pages of every full group of layers; a sliding group (Gemma 2's, window 5) keeps
    # only the window before each row's last key (its snapshot), which is all a later hit reads.
    kept = 0
    for group in model.hf_paged_runtime.groups:
        for n in real:
            end = (n - 1) // 4 * 4
            first = 0 if group.window is None else max(0, end - group.window + 1)
            kept += end // group.page_size - first // group.page_size
    assert stats["cached_pages"] == kept and stats["pages_in_use"] == kept


def test_pads_are_never_part_of_a_key_and_a_shared_prefix_is_reused_across_prompts():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 128, (16,), generator=generator)
    questions = [torch.randint(3, 128, (n,), generator=generator) for n in (5, 9)]
    prompts = [torch.cat([shared, q]) for q in questions]
    first, second = left_padded(prompts[:1], 21), left_padded(prompts[1:], 30)  # other padding, other widths
    expected = [generate(model, *first), generate(model, *second)]
    hf_paged.wrap(model, num_pages=128, page_size=4, prefix_cache=True)
    assert torch.equal(generate(model, *first), expected[0])
    assert torch.equal(generate(model, *second), expected[1])
    assert hf_paged.memory_stats(model)["prefix_hit_tokens"] == 16  # the shared 16 tokens, reused once


def test_a_prefix_shared_within_the_first_batch_is_computed_once():
    """A few-shot batch on an empty cache: one row computes the shared pages, the others adopt them."""
    model = tiny_model("gemma2")  # a sliding-window group too
    generator = torch.Generator().manual_seed(6)
    shared = torch.randint(3, 128, (16,), generator=generator)
    prompts = [torch.cat([shared, torch.randint(3, 128, (n,), generator=generator)]) for n in (5, 9, 3, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    expected = {mode: generate(model, ids, mask, **kw) for mode, kw in MODES.items()}
    hf_paged.wrap(model, num_pages=256, page_size=4, prefix_cache=True)
    assert torch.equal(generate(model, ids, mask), expected["greedy"])
    assert hf_paged.memory_stats(model)["prefix_hit_tokens"] == 3 * 16  # three rows reused the first's 4 pages
    hf_paged.clear_prefix_cache(model)
    for mode, kw in MODES.items():
        assert torch.equal(generate(model, ids, mask, **kw), expected[mode]), mode


def test_assisted_decoding_with_the_cache_on_matches_stock():
    """transformers' assisted decoding gives other tokens on a prefilled cache (a DynamicCache too),
    so such calls reuse nothing and keep nothing."""
    model = tiny_model("llama")
    input_ids = torch.randint(3, 128, (1, 18), generator=torch.Generator().manual_seed(8))
    input_ids[0, 9:14] = input_ids[0, 2:7]  # something for prompt lookup to find
    kwargs = dict(max_new_tokens=8, prompt_lookup_num_tokens=3, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    hf_paged.wrap(model, num_pages=64, page_size=4, prefix_cache=True)
    for _ in range(2):
        assert torch.equal(model.generate(input_ids, **kwargs), expected)
    assert hf_paged.memory_stats(model)["prefix_lookup_tokens"] == 0


def change_weights(model, change: str, input_ids) -> None:
    """The ways users change a model's weights between calls."""
    other = tiny_model("llama", seed=11).state_dict()
    if change == "in_place":
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(other[name])
    elif change == "load_state_dict":
        model.load_state_dict(other)
    else:  # a training step
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "optimizer_step"])
def test_a_change_of_weights_empties_the_cache_before_anything_stale_is_read(change):
    model, reference = tiny_model("llama"), tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, length=17, pads=(0, 3))
    change_weights(reference, change, input_ids)
    expected = generate(reference, input_ids, mask)
    hf_paged.wrap(model, num_pages=64, page_size=4, prefix_cache=True)
    generate(model, input_ids, mask)
    generate(model, input_ids, mask)
    hits = hf_paged.memory_stats(model)["prefix_hits"]
    assert hits > 0
    change_weights(model, change, input_ids)
    assert torch.equal(generate(model, input_ids, mask), expected)
    assert hf_paged.memory_stats(model)["prefix_hits"] == hits  # nothing computed before the change was read


def test_a_new_dtype_gets_a_new_pool_and_its_own_prefix_cache():
    """model.to(dtype) replaces the pool on the next call: the prefix cache of the new pool is used."""
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, length=17, pads=(0, 3))
    hf_paged.wrap(model, num_pages=64, page_size=4, prefix_cache=True)
    generate(model, input_ids, mask)
    model.to(torch.float64)
    hf_paged.unwrap(model)
    expected = generate(model, input_ids, mask)
    model.to(torch.float32)
    hf_paged.wrap(model, num_pages=64, page_size=4, prefix_cache=True)
    generate(model, input_ids, mask)
    model.to(torch.float64)
    for _ in range(2):  # the first call fills the new pool's cache, the second reads it
        assert torch.equal(generate(model, input_ids, mask), expected)
    assert hf_paged.memory_stats(model)["prefix_hits"] > 0


def test_concurrent_calls_share_the_prefix_cache_and_give_stock_tokens():
    model = tiny_model("llama")
    prompts = [padded_prompts(batch=2, length=17, pads=(0, 3), seed=s % 3) for s in range(6)]
    expected = [generate(model, ids, mask) for ids, mask in prompts]
    hf_paged.wrap(model, num_pages=100, page_size=4, prefix_cache=True)  # calls at once need ~84: some evict

    def three_calls(index):  # greedy: no thread reseeds torch's shared generator
        return [generate(model, *prompts[index], seed=None) for _ in range(3)]

    for index, outputs in enumerate(run_threads(three_calls, len(prompts))):
        for call, got in enumerate(outputs):
            assert torch.equal(got, expected[index]), (index, call)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == stats["cached_pages"]


def test_clear_and_unwrap_return_every_cached_page():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4, prefix_cache=True)
    input_ids, mask = padded_prompts(batch=2, length=17, pads=(0, 3))
    generate(model, input_ids, mask)
    assert hf_paged.memory_stats(model)["pages_in_use"] == hf_paged.memory_stats(model)["cached_pages"] > 0
    hf_paged.clear_prefix_cache(model)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    generate(model, input_ids, mask)
    blocks = model.hf_paged_runtime.pool.blocks
    hf_paged.unwrap(model)
    assert blocks.num_used_pages == 0


def test_a_small_pool_evicts_instead_of_failing_and_fails_only_when_it_must():
    model = tiny_model("llama")
    prompts = [padded_prompts(batch=1, length=17, pads=(0,), seed=s) for s in range(6)]
    expected = [generate(model, ids, mask) for ids, mask in prompts]
    hf_paged.wrap(model, num_pages=12, page_size=4, prefix_cache=True)  # 6 pages per call, 4 kept each
    for (ids, mask), tokens in zip(prompts, expected):
        assert torch.equal(generate(model, ids, mask), tokens)
        stats = hf_paged.memory_stats(model)
        assert stats["pages_in_use"] == stats["cached_pages"] <= 12
    assert hf_paged.memory_stats(model)["prefix_evictions"] >= 12
    long_ids, long_mask = padded_prompts(batch=1, length=40, pads=(0,), seed=9)
    with pytest.raises(OutOfPagesError):  # 12 pages for the prompt alone: more than the pool
        generate(model, long_ids, long_mask, max_new_tokens=10)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == stats["cached_pages"]


def test_off_by_default():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    input_ids, mask = padded_prompts()
    generate(model, input_ids, mask)
    stats = hf_paged.memory_stats(model)
    assert stats["pages_in_use"] == 0 and "cached_pages" not in stats


def test_eval_reports_the_hit_rate_and_stays_in_agreement(tmp_path):
    """scripts/eval.py --prefix-cache: the same outputs as stock, and the summary's hit rate is the
    share of reusable prompt tokens found. The untimed warm-up leaves no trace: the timed run counts
    what it counts without one (issue 20: the warm-up's pages were counted as hits)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "eval.py"
    spec = importlib.util.spec_from_file_location("hf_paged_eval_script_prefix", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    summaries = {}
    try:
        for warmup in ([], ["--no-warmup"]):
            out = tmp_path / (warmup[0] if warmup else "warmup")
            code = module.main(["--limit", "4", "--batch-size", "2", "--max-new-tokens", "3", "--prefix-cache",
                                "--compare", "--output-dir", str(out), *warmup])
            assert code == 0
            summaries[bool(warmup)] = json.loads((out / "summary.json").read_text())
    finally:
        torch.set_num_threads(threads)
    summary = summaries[False]
    prefix = summary["prefix_cache"]
    records = [json.loads(line) for line in (tmp_path / "warmup" / "samples.jsonl").read_text().splitlines()]
    reusable = sum(((r["prompt_tokens"] - 1) // 16) * 16 for r in records)
    assert prefix["prefix_lookup_tokens"] == reusable > 0
    assert prefix == summaries[True]["prefix_cache"]  # the warm-up's pages were no hits
    assert prefix["hit_rate"] < 1.0  # four different prompts: not everything is found
    assert summary["agreement"] == 1.0


def test_the_few_shot_bench_workload_runs_matches_stock_and_hits_every_reusable_page(capsys):
    """scripts/bench.py --prefix-cache on its quick sizes (the targets apply to the full sizes:
    --quick shows no target and no verdict)."""
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        import bench
    finally:
        sys.path.remove(scripts)
    threads = torch.get_num_threads()
    try:
        document = bench.main(["--quick", "--workload", "none", "--prefix-cache", "--no-memory", "--reps", "1"])
    finally:
        torch.set_num_threads(threads)
    few = document["few_shot"]
    assert few["tokens_match"] is True
    assert few["warm_hit_tokens"] == few["warm_reusable_tokens"] > 0
    assert few["shape"] == dict(prefix_len=64, num_questions=8, batch_size=4, new_tokens=16)
    assert few["target_time_ratio"] is None and few["meets_targets"] is None
    printed = capsys.readouterr().out
    few_shot_lines = printed[printed.index("few-shot:"):]
    assert "target" not in few_shot_lines and "meets targets" not in printed


def test_sliding_groups_keep_window_snapshots_and_a_hit_ends_where_one_is_whole():
    """Two groups, keys of 4 tokens: a full group (pages of 4) and a window of 5 (pages of 2). The
    row kept only its window in the sliding group (holes before it): a hit ends at a key whose last
    4 tokens are held there, and eviction takes single pages nothing else holds."""
    blocks = BlockManager(16)
    hole = blocks.num_pages
    prefix = PrefixCache(blocks, 4)
    tokens = list(range(10, 23))  # 13 tokens: 3 keys before the last one
    full = blocks.allocate(3)  # [0, 1, 2]: tokens 0..11
    sliding = blocks.allocate(2)  # [3, 4]: tokens 8..11, its window after 12 tokens
    prefix.insert(tokens[:12], [full, [hole] * 4 + sliding], [4, 2])
    groups = [(None, 4), (5, 2)]
    assert prefix.pages_of[page_keys(tokens, 4, 3)[2]] == ((2,), (3, 4))
    assert prefix.pages_of[page_keys(tokens, 4, 2)[1]] == ((1,), (hole, hole))
    assert prefix.match(tokens, groups=groups) == [((0,), (hole, hole)), ((1,), (hole, hole)), ((2,), (3, 4))]
    assert prefix.match(tokens[:9] + [99, 99, 99, 99], groups=groups) == []  # key 2 differs: key 1 holds no window
    assert prefix.num_chained(tokens[:9] + [99, 99, 99, 99]) == 2  # but the chain went on from there
    blocks.free(full + sliding)  # the row ends: the cache alone holds them
    blocks.fork([2, 4])  # another row reads pages 2 and 4
    assert prefix.num_evictable() == 3 and prefix.evict(1) == 1  # the chain's tail entry first: its page 3
    assert prefix.pages_of[page_keys(tokens, 4, 3)[2]] == ((2,), (hole, 4)) and blocks.ref_counts[3] == 0
    assert prefix.match(tokens, groups=groups) == []  # no whole window left at any key
    assert prefix.evict(3) == 2 and sorted(prefix.key_of) == [2, 4]  # pages 0 and 1: their entries go
    assert list(prefix.pages_of.values()) == [((2,), (hole, 4))]


def test_a_window_whose_first_needed_token_sits_mid_page_needs_that_whole_page():
    """The fixture above at window 6 (keys of 4; a full group, pages of 4; a sliding group, pages of
    2): after 12 tokens the next query sees tokens 7..12, and token 7 shares its sliding page with
    token 6. Where that page is a hole (released by a window, or evicted) no key holds a whole
    window; a check starting one token late would look only at tokens 8..11 and hit."""
    blocks = BlockManager(16)
    hole = blocks.num_pages
    prefix = PrefixCache(blocks, 4)
    tokens = list(range(10, 23))  # 13 tokens: 3 keys before the last one
    full = blocks.allocate(3)  # [0, 1, 2]: tokens 0..11
    sliding = blocks.allocate(2)  # [3, 4]: tokens 8..11; the page of tokens 6..7 is a hole
    prefix.insert(tokens[:12], [full, [hole] * 4 + sliding], [4, 2])
    window_6, window_5 = [(None, 4), (6, 2)], [(None, 4), (5, 2)]
    assert prefix.match(tokens, groups=window_6) == []  # token 7 is missing at key 3; keys 1 and 2 miss more
    assert prefix.match(tokens, groups=window_5) == [((0,), (hole, hole)), ((1,), (hole, hole)), ((2,), (3, 4))]
    # Another row that held tokens 6..7 fills the hole: now window 6 hits up to key 3.
    (page,) = blocks.allocate(1)  # 5
    prefix.insert(tokens[:12], [full, [hole] * 3 + [page] + sliding], [4, 2])
    assert prefix.match(tokens, groups=window_6) == [((0,), (hole, hole)), ((1,), (hole, 5)), ((2,), (3, 4))]
    assert prefix.match(tokens[:9] + [99, 99, 99, 99], groups=window_6) == []  # key 2 needs tokens 3..7: 2..3 is a hole
