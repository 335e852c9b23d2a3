"""scripts/bench.py on bad input or a pool too small for the run: one line on stderr and exit code 2,
as scripts/eval.py (issue 34), never a traceback."""

import os
import sys

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, SCRIPTS)
    try:
        import bench
    finally:
        sys.path.remove(SCRIPTS)
    return bench


def run_failing(bench, capsys, *flags: str) -> str:
    """The one error line bench.main prints for `flags` (its progress bar aside), after exit code 2."""
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(list(flags))
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("bench:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_pool_too_small_for_the_run_says_which_flags_to_change(bench, capsys):
    line = run_failing(bench, capsys, "--quick", "--num-pages", "3", "--no-memory", "--reps", "1", "--workload", "greedy")
    assert "out of pages: needed" in line and "3 of 3 free" in line and "--num-pages" in line


def test_an_unknown_workload_lists_every_workload(bench, capsys):
    line = run_failing(bench, capsys, "--workload", "bogus")
    assert "['bogus']" in line
    for name in [*bench.WORKLOADS, "overhead"]:
        assert f"'{name}'" in line
    assert "'bogus2'" in run_failing(bench, capsys, "--workload", "greedy,overhead,bogus2")


@pytest.mark.parametrize("flags", [("--num-pages", "-1"), ("--page-size", "0")])
def test_pool_flags_out_of_range_say_what_is_expected(bench, capsys, flags):
    assert "expected --num-pages >= 0" in run_failing(bench, capsys, *flags)
