"""Make eval.py's built-in task: complete held-out standard-library functions from their signature and docstring.

    PYTHONPATH=. python scripts/make_default_data.py      # writes hf_paged/data/stdlib_functions.jsonl

Reads the modules the default model never trained on (hf_paged.evaluation.corpus.HELD_OUT_MODULES)
of this Python's standard library. A sample is a function or method (not a nested function) with a
docstring and at least one statement after it:
- prompt: its source from the `def` line through the docstring's last line, plus a newline;
- reference: the next --reference-lines lines of its body that are not blank, as written.
Prompts longer than --max-prompt-tokens (default model's tokenizer) are left out; --num-samples
samples are taken evenly spaced from the rest, in module and source order. The file shipped was
made from CPython 3.11.7 with the defaults.
"""

import argparse
import ast
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from hf_paged.evaluation import DATA_DIR, default_model_path
from hf_paged.evaluation.corpus import HELD_OUT_MODULES, module_files, read_source, stdlib_dir


def functions(tree: ast.Module):
    """Top-level functions and the methods of top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.name
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child, f"{node.name}.{child.name}"


def samples_of(module: str, path: Path, text: str, reference_lines: int) -> list[dict]:
    lines = text.splitlines()
    found = []
    for node, name in functions(ast.parse(text)):
        if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
            continue
        docstring_end = node.body[0].end_lineno  # 1-based, inclusive
        body = [line for line in lines[docstring_end : node.end_lineno] if line.strip()]
        found.append({
            "id": f"{module}:{name}",
            "prompt": "\n".join(lines[node.lineno - 1 : docstring_end]) + "\n",
            "reference": "\n".join(body[:reference_lines]),
            "file": path.name,
            "line": node.lineno,
        })
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DATA_DIR / "stdlib_functions.jsonl")
    parser.add_argument("--num-samples", type=int, default=40)
    parser.add_argument("--reference-lines", type=int, default=3)
    parser.add_argument("--max-prompt-tokens", type=int, default=320)
    parser.add_argument("--tokenizer", default=None, help="counts prompt tokens (default: the default model's)")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_path())
    candidates = []
    for module in HELD_OUT_MODULES:
        for path in module_files(module):
            text = read_source(path)
            if text is not None:
                candidates += samples_of(module, path, text, args.reference_lines)
    fitting = [sample for sample in candidates if len(tokenizer(sample["prompt"])["input_ids"]) <= args.max_prompt_tokens]
    step = len(fitting) / args.num_samples
    chosen = [fitting[int(i * step)] for i in range(min(args.num_samples, len(fitting)))]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in chosen), encoding="utf-8")
    modules = sorted({sample["id"].split(":")[0] for sample in chosen})
    print(f"{len(chosen)} of {len(fitting)} functions ({len(candidates)} with a docstring) from {len(modules)} modules "
          f"of {stdlib_dir()}: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
