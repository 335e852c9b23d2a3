"""The kit for a GPU machine without network (docs/development.md): scripts/gpu_check.sh and
scripts/gpu_wheels.sh parse, and scripts/gpu_smoke.py runs its calls on CPU (torch executor)."""

import subprocess

import pytest

from script_runs import ROOT, load_script

gpu_smoke = load_script(ROOT / "scripts" / "gpu_smoke.py", "hf_paged_gpu_smoke_script")


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    run = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_smoke_runs_on_cpu_with_the_torch_executor(tmp_path):
    report = gpu_smoke.main(["--device", "cpu", "--limit", "2", "--new-tokens", "3", "--json", str(tmp_path / "smoke.json")])
    assert [run["num_beams"] for run in report["runs"]] == [1, 4]  # no CUDA: no head-dim-128 fp8 run
    for run in report["runs"]:
        sides = run["sides"]
        assert set(sides) == {"stock", "torch pages", "fp8_e4m3 pages (auto backend)"}
        assert all("error" not in side and side["repeat_equal"] for side in sides.values())
        # fp32 logits are stock's on CPU; in bf16 the default model's pages give stock's tokens here
        assert sides["stock"]["rows_equal_torch_pages"] == 1.0 and sides["torch pages"]["rows_equal_torch_pages"] == 1.0
        assert sides["torch pages"]["executor"] == sides["fp8_e4m3 pages (auto backend)"]["executor"] == "torch"
        fp8, bf16 = sides["fp8_e4m3 pages (auto backend)"]["peak_pool_bytes"], sides["torch pages"]["peak_pool_bytes"]
        # greedy takes the same pages whatever the tokens; beams may part differently under fp8
        assert fp8 * 2 == bf16 if run["num_beams"] == 1 else fp8 < bf16
        assert sides["torch pages"]["pages_in_use_after"] == 0
    assert (tmp_path / "smoke.json").exists()
