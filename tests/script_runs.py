"""The project's scripts (scripts/eval.py, scripts/bench.py) loaded or started the way the tests need."""

import importlib.util
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL_SCRIPT = ROOT / "scripts" / "eval.py"
# Scripts started as processes import the hf_paged of this checkout, not whichever one is installed.
CHECKOUT = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
SAMPLE_FIELDS = {"index", "id", "prompt_tokens", "output_text", "output_texts", "output_ids", "generated_tokens", "reference", "batch"}
SUMMARY_FIELDS = {
    "num_samples", "tokens_per_second", "time_to_first_token_s", "peak_kv_bytes", "peak_shared_pages", "scores",
}


def load_script(path: Path, name: str):
    """Import a script file as module `name` (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_script = load_script(EVAL_SCRIPT, "hf_paged_eval_script")


def run_eval(tmp_path: Path, *args: str) -> tuple[int, list[dict], dict]:
    """eval.py's main(args) with --output-dir; returns (exit code, samples.jsonl records, summary.json).

    main() sets torch's thread count; tests/conftest.py restores it after every test.
    """
    out = tmp_path / "out"
    code = eval_script.main([*args, "--output-dir", str(out)])
    if code != 0:
        return code, [], {}
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return code, records, json.loads((out / "summary.json").read_text())
