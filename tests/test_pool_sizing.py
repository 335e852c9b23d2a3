"""Pool sizing (issue 34): a pool of 2**63 bytes or more is a ValueError saying what to pass, raised
before any allocation; the CPU budget is a fraction of available RAM (MemAvailable), not free RAM."""

import os
import sys
import types

import pytest
import torch

import hf_paged
from hf_paged.memory import pool as pool_module
from hf_paged.memory.pool import available_ram_bytes, free_memory_bytes

from tiny import tiny_model


REAL_EMPTY = torch.empty


def refuse_pool_allocation(*args, **kwargs):
    """torch.empty, but a pool slice (`[2, num_pages + 1, bytes]`) fails the test."""
    if args and isinstance(args[0], tuple) and len(args[0]) == 3:
        raise AssertionError(f"a pool of shape {args[0]} was allocated")
    return REAL_EMPTY(*args, **kwargs)


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(num_pages=10**19), "num_pages=10000000000000000000"),  # past int64: torch.empty raised TypeError
        (dict(num_pages=2**53), f"num_pages={2**53}"),  # fits int64, but not times 8192 bytes a page
        (dict(max_memory=2**63), f"max_memory={2**63}"),
        (dict(max_memory=10**30), f"max_memory={10**30}"),
    ],
)
def test_a_pool_of_2_63_bytes_or_more_is_a_value_error_before_any_allocation(monkeypatch, settings, named):
    model = tiny_model("llama")
    monkeypatch.setattr(torch, "empty", refuse_pool_allocation)
    with pytest.raises(ValueError, match=rf"{named} asks for a pool of \d+ pages of 8192 bytes .*2\*\*63 bytes or more.*"
                       r"pass num_pages=.*or max_memory="):
        hf_paged.wrap(model, **settings)
    assert not hasattr(model, "hf_paged_runtime") and model.config._attn_implementation != "hf_paged"
    monkeypatch.undo()
    hf_paged.wrap(model, num_pages=16, page_size=4)  # a wrapped model keeps its pool on the same error
    runtime = model.hf_paged_runtime
    with pytest.raises(ValueError, match="2\\*\\*63 bytes or more"):
        hf_paged.wrap(model, **settings)
    assert model.hf_paged_runtime is runtime and hf_paged.memory_stats(model)["num_pages"] == 16


def meminfo_available() -> int:
    with open("/proc/meminfo") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux's /proc/meminfo")
def test_the_cpu_budget_is_available_ram_as_proc_meminfo_reports_it():
    # Read back to back; other processes may move it a little in between.
    before, measured, after = meminfo_available(), free_memory_bytes(torch.device("cpu")), meminfo_available()
    assert min(before, after) - (32 << 20) <= measured <= max(before, after) + (32 << 20)


def test_available_ram_is_memavailable_not_memfree(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         8400000 kB\nMemAvailable:   14200000 kB\n")
    assert available_ram_bytes(str(meminfo)) == 14200000 * 1024


def test_without_proc_meminfo_psutil_reports_available_ram(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=123 << 20, free=45 << 20))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert available_ram_bytes(str(tmp_path / "missing")) == 123 << 20
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: free RAM, or 8 GiB where none is reported
    assert available_ram_bytes(str(tmp_path / "missing")) > 0


def test_a_fraction_of_memory_sizes_the_pool_from_available_ram(monkeypatch):
    monkeypatch.setattr(pool_module, "available_ram_bytes", lambda: 1 << 30)
    model = hf_paged.wrap(tiny_model("llama"), max_memory=0.5)
    assert hf_paged.memory_stats(model)["num_pages"] == (1 << 29) // 8192
