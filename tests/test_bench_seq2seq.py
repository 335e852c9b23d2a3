"""scripts/bench.py --seq2seq: the encoder-decoder workloads (scripts/_bench_seq2seq.py)."""

import os
import sys

import pytest

from test_bench import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import _bench_seq2seq as seq2seq  # noqa: E402

sys.path.pop(0)


def token_bytes(sizes: dict) -> int:
    """K and V of one token in every decoder layer, fp32 (self- and cross-attention layers alike)."""
    return sizes["layers"] * 2 * sizes["d_model"] * 4


def test_the_three_shapes_and_their_limits_are_the_issues():
    shapes = {w.name: (w.model, w.source_len, w.target_len, w.num_beams) for w in seq2seq.SEQ2SEQ}
    assert shapes == {"translation": ("marian", 60, 60, 6), "summarization": ("bart", 1024, 142, 4),
                      "speech": ("whisper", 1500, 100, 5)}
    # issue 29's table: 6 x 60 + 60 of 6 x 120; 4 x 142 + 1,024 of 4 x 1,166; 5 x 100 + 1,500 of 5 x 1,600
    limits = {w.name: round(w.limit, 2) for w in seq2seq.SEQ2SEQ}
    assert limits == {"translation": 0.58, "summarization": 0.34, "speech": 0.25}


@pytest.mark.parametrize("workload", seq2seq.SEQ2SEQ, ids=lambda w: w.name)
def test_stock_kv_is_self_plus_cross_attention_of_every_row(workload):
    """What stock's EncoderDecoderCache holds at its largest: every row its own copy of the source's
    cross-attention K/V and its decoder tokens (the start token and all new ones but the last)."""
    workload = seq2seq.quick(workload)
    sizes = seq2seq.QUICK_SIZES
    stock, _ = seq2seq.build_pair(workload, sizes, seed=0)
    inputs = seq2seq.make_inputs(workload, sizes["vocab"], seed=0)
    sequences, peak = seq2seq.stock_peak_kv(stock, inputs, seq2seq.generate_kwargs(workload), seed=0)
    assert sequences.shape[0] == workload.batch_size
    assert peak == workload.rows * (workload.source_len + workload.target_len) * token_bytes(sizes)


@pytest.mark.subprocess
@pytest.mark.slow
def test_quick_run_reports_the_pool_against_stock_and_the_limit(tmp_path):
    output = {}
    document = run_bench(tmp_path, "--workload", "none", "--seq2seq", output=output)
    runs = {r["workload"]["name"]: r for r in document["seq2seq"]}
    assert list(runs) == ["translation", "summarization", "speech"]
    sizes = seq2seq.QUICK_SIZES
    for name, run in runs.items():
        workload = seq2seq.Seq2SeqWorkload(**run["workload"])
        assert run["tokens_match"] is True, name
        assert run["meets_target"] is None  # --quick: no targets
        assert run["stock_kv_bytes"] == workload.rows * (workload.source_len + workload.target_len) * token_bytes(sizes)
        # The pool at its peak: at most the cross-attention K/V once per input and each row's decoder
        # tokens, each rounded up to whole pages, plus a page per row held while a step runs (beams
        # still sharing their first decoder page hold less).
        page = run["page_size"]
        pages = workload.batch_size * -(-workload.source_len // page) + workload.rows * (-(-workload.target_len // page) + 1)
        assert 0 < run["paged_pool_bytes"] <= pages * page * token_bytes(sizes), name
        assert run["paged_pool_bytes"] % (page * token_bytes(sizes)) == 0, name
        assert run["pool_ratio"] == run["paged_pool_bytes"] / run["stock_kv_bytes"]
        assert run["seconds"]["stock"] > 0 and run["seconds"]["paged"] > 0
    assert "encoder-decoder models" in output["stdout"] and "limit" in output["stdout"]


def test_kv_cache_dtype_reaches_the_seq2seq_pool():
    """`bench.py --seq2seq --kv-cache-dtype fp8_e4m3`: the wrapped model's pages (self- and
    cross-attention) hold one byte per value, a quarter of fp32's page bytes; no target applies."""
    from argparse import Namespace

    workload = seq2seq.SEQ2SEQ[0]
    runs = {dtype: seq2seq.measure_seq2seq(workload, Namespace(seed=0, page_size=4, num_pages=0, reps=1, kv_cache_dtype=dtype),
                                           is_quick=True, apply_target=False)
            for dtype in ("auto", "fp8_e4m3")}
    assert runs["fp8_e4m3"]["kv_cache_dtype"] == runs["fp8_e4m3"]["memory_stats"]["kv_cache_dtype"] == "fp8_e4m3"
    assert runs["fp8_e4m3"]["memory_stats"]["peak_cross_attention_pages"] > 0
    assert runs["auto"]["page_bytes"] == 4 * runs["fp8_e4m3"]["page_bytes"]
    assert runs["fp8_e4m3"]["meets_target"] is None
