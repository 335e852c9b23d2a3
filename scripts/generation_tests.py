"""Run transformers' own generation tests (GenerationTesterMixin) on models wrapped by hf_paged.

Each model's test file runs twice, unwrapped (stock) and with every model wrapped on its first
generate() call (scripts/_generation_plugin.py), and the script reports per model: the tests that
pass on stock, those that pass wrapped, and each test that fails wrapped but passes on stock, with
the first line of its error. `--twin` also runs every generate() call on an unwrapped copy of the
model and lists the calls whose tokens differ.

The test files are not part of transformers' wheel or sdist: point `--transformers` at a checkout
of the release installed (its `tests/` folder), for example

    git clone --depth 1 --branch v5.25.0 https://github.com/huggingface/transformers /tmp/transformers
    python scripts/generation_tests.py --transformers /tmp/transformers --models llama mistral gemma2 gpt2

docs/generation-tests.md says more, and what the last run found.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def run_pytest(checkout: Path, test_file: Path, wrapped: bool, work: Path, extra: list[str], twin: bool) -> dict:
    """{test name: ("passed" | "failed" | "skipped", first line of the message)} of one run."""
    report = work / ("wrapped.xml" if wrapped else "stock.xml")
    command = [sys.executable, "-m", "pytest", str(test_file), "-m", "generate", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(ROOT), str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if wrapped:
        command += ["-p", "_generation_plugin"]
        env.update(HF_PAGED_TWIN="1" if twin else "0", HF_PAGED_TWIN_LOG=str(work / "twin.jsonl"))
    subprocess.run(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    if not report.exists():
        return results
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0] if message else ""
            elif child.tag == "skipped":
                outcome = "skipped"
        results[name] = (outcome, message)
    return results


def compare(model: str, checkout: Path, extra: list[str], twin: bool) -> dict:
    test_file = checkout / "tests" / "models" / model / f"test_modeling_{model}.py"
    if not test_file.exists():
        raise SystemExit(f"{test_file} not found: --transformers must be a checkout with tests/models/{model}/")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        stock = run_pytest(checkout, test_file, False, work, extra, twin)
        wrapped = run_pytest(checkout, test_file, True, work, extra, twin)
        log = work / "twin.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    passed_stock = sorted(name for name, (outcome, _) in stock.items() if outcome == "passed")
    return {
        "model": model,
        "stock_passed": len(passed_stock),
        "wrapped_passed": sum(outcome == "passed" for outcome, _ in wrapped.values()),
        "collected": len(stock),
        "fail_wrapped_only": {name: wrapped.get(name, ("missing", ""))[1] for name in passed_stock
                              if wrapped.get(name, ("missing", ""))[0] != "passed"},
        "twin_log": calls,
    }


def markdown(results: list[dict]) -> str:
    lines = ["| model | tests | pass on stock | pass wrapped | fail wrapped only |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['collected']} | {r['stock_passed']} | {r['wrapped_passed']} | {len(r['fail_wrapped_only'])} |")
    for r in results:
        for name, message in r["fail_wrapped_only"].items():
            lines.append(f"- {r['model']} `{name}`: {message}")
        for call in r["twin_log"]:
            lines.append(f"- {r['model']} twin: {json.dumps(call)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers", type=Path, required=True, help="a transformers checkout (its tests/ folder)")
    parser.add_argument("--models", nargs="+", default=["llama", "mistral", "gemma2", "gpt2"])
    parser.add_argument("--twin", action="store_true", help="compare every generate() call with an unwrapped copy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -k beam")
    args = parser.parse_args(argv)
    results = [compare(model, args.transformers.resolve(), args.pytest_args, args.twin) for model in args.models]
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
