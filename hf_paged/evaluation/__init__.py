"""Helpers of scripts/eval.py: data through `datasets`, models, batched generation, scores, reports.

Not part of the library's API (`hf_paged` does not import this package); kept here so the script
stays readable and the pieces can be tested on their own.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class EvalError(Exception):
    """A problem with the user's input: scripts/eval.py prints the message on one line and exits 2."""


def default_model_path() -> Path:
    """The folder of the trained default model that ships with hf_paged (docs/default_model.md):
    `AutoModelForCausalLM.from_pretrained(default_model_path())` and `AutoTokenizer` load it offline."""
    return DATA_DIR / "default_model"
