"""Perplexity of a causal LM on Python code: the default model's held-out stdlib modules and installed packages.

    PYTHONPATH=. python scripts/perplexity.py                        # default model, held-out modules, packaging, tqdm
    PYTHONPATH=. python scripts/perplexity.py --packages requests --json out/ppl.json
    PYTHONPATH=. python scripts/perplexity.py --modules textwrap --packages packaging.version   # a quick look

Each source is its .py files, each file BOS + tokens + EOS, scored in windows of the model's context
(hf_paged.evaluation.perplexity). Prints one row per source and the random-weight baseline, a model of
the same config and seed-0 random weights (its perplexity is about the vocabulary size).
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_paged.evaluation import default_model_path
from hf_paged.evaluation.corpus import HELD_OUT_MODULES, module_files
from hf_paged.evaluation.perplexity import perplexity, read_files


def package_files(name: str) -> list[Path]:
    """The .py files of an installed package (or module), sorted."""
    module = importlib.import_module(name)
    if hasattr(module, "__path__"):
        return sorted(path for folder in module.__path__ for path in Path(folder).rglob("*.py"))
    return [Path(module.__file__)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: hf_paged's default model)")
    parser.add_argument("--modules", nargs="*", default=list(HELD_OUT_MODULES),
                        help="held-out stdlib modules (default: all of hf_paged.evaluation.corpus.HELD_OUT_MODULES)")
    parser.add_argument("--packages", nargs="*", default=["packaging", "tqdm"],
                        help="installed non-stdlib packages or modules (e.g. packaging.version)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    context = model.config.max_position_embeddings
    unknown = sorted(set(args.modules) - set(HELD_OUT_MODULES))
    if unknown:
        parser.error(f"--modules {' '.join(unknown)}: not held out from training; choose from {', '.join(HELD_OUT_MODULES)}")
    sources = {"held-out stdlib modules": [file for name in args.modules for file in module_files(name)]}
    sources |= {f"package {name}": package_files(name) for name in args.packages}
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype).eval()
    results = {}
    for title, files in sources.items():
        texts = read_files(files)
        results[title] = perplexity(model, tokenizer, texts, context) | {"num_files": len(texts)}
        print(f"{title:28s} perplexity {results[title]['perplexity']:8.2f}  ({results[title]['num_tokens']} tokens, "
              f"{len(texts)} files)", flush=True)
    baseline = perplexity(random_model, tokenizer, read_files(sources["held-out stdlib modules"][:3]), context)
    results["random weights (first 3 held-out files)"] = baseline
    print(f"{'random weights (3 files)':28s} perplexity {baseline['perplexity']:8.2f}  (vocabulary {len(tokenizer)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(path), "dtype": args.dtype, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
