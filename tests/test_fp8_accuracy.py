"""scripts/fp8_accuracy.py: the accuracy table of docs/fp8.md runs, and its rounded-K/V stores round as said."""

import pytest
import torch

from script_runs import ROOT, load_script

fp8_accuracy = load_script(ROOT / "scripts" / "fp8_accuracy.py", "hf_paged_fp8_accuracy_script")


def test_seven_mantissa_bits_leave_bf16_alone():
    x = torch.randn(4096, dtype=torch.float32).mul_(100).to(torch.bfloat16)
    assert torch.equal(fp8_accuracy.round_mantissa(x, 7), x)
    assert not torch.equal(fp8_accuracy.round_mantissa(x, 6), x)


@pytest.mark.parametrize("bits, dtype", [(3, torch.float8_e4m3fn), (2, torch.float8_e5m2)])
def test_fp8_mantissa_bits_round_as_fp8_in_its_normal_range(bits, dtype):
    """Inside the format's normal range, rounding to e4m3's 3 (e5m2's 2) mantissa bits is the fp8 cast."""
    info = torch.finfo(dtype)
    x = torch.empty(100_000).uniform_(-1, 1).mul_(torch.finfo(dtype).max / 2)
    x = x[x.abs() >= info.tiny]
    assert torch.equal(fp8_accuracy.round_mantissa(x, bits), x.to(dtype).float())


def test_the_table_runs_on_two_prompts(tmp_path):
    document = fp8_accuracy.main(["--limit", "2", "--max-new-tokens", "3", "--mantissa-bits", "7,3",
                                  "--json", str(tmp_path / "fp8.json")])
    rows = {row["store"]: row for row in document["table"]}
    assert {"stock", "pages auto", "pages fp8_e4m3", "pages fp8_e5m2", "QuantizedCache fp8",
            "stock, K/V 7 mantissa bits", "stock, K/V 3 mantissa bits"} <= set(rows)
    # bf16 weights: 7 mantissa bits are bf16's own, so that store is stock, token for token and logit for logit
    seven = rows["stock, K/V 7 mantissa bits"]
    assert seven["greedy_vs_stock"] == seven["beam4_vs_stock"] == 1.0
    assert seven["logit_error"] == rows["stock"]["logit_error"] and seven["top1_vs_fp32"] == rows["stock"]["top1_vs_fp32"]
    assert rows["pages fp8_e4m3"]["page_bytes"] * 2 == rows["pages auto"]["page_bytes"]
    assert all(0.0 <= row[key] <= 1.0 for row in rows.values() for key in ("greedy_vs_stock", "top1_vs_fp32"))
    assert (tmp_path / "fp8.json").exists()
