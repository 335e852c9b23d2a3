"""Helpers of scripts/eval.py: data through `datasets`, models, batched generation, scores, reports.

Not part of the library's API (`hf_paged` does not import this package); kept here so the script
stays readable and the pieces can be tested on their own.
"""


class EvalError(Exception):
    """A problem with the user's input: scripts/eval.py prints the message on one line and exits 2."""
