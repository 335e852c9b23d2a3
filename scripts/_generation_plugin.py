"""pytest plugin: every model transformers' tests call generate() on runs wrapped by hf_paged.

Loaded by scripts/generation_tests.py (`-p _generation_plugin`, with scripts/ on PYTHONPATH):
`GenerationMixin.generate` is replaced by a function that, on a model's first call, wraps it with
`hf_paged.wrap(model)` and runs the call on it. With HF_PAGED_TWIN=1 it first deep-copies the
model (the unwrapped twin) and runs every call on both, from the same random state: calls whose
tokens (or scores) differ are written to HF_PAGED_TWIN_LOG (one JSON line per call).

A model wrap() refuses (UnsupportedModelError) runs stock; refusals are logged the same way.
Nothing here touches the tests themselves.
"""

import copy
import json
import os

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache

import hf_paged

_ORIGINAL = GenerationMixin.generate
_LOG = os.environ.get("HF_PAGED_TWIN_LOG")
_TWIN = os.environ.get("HF_PAGED_TWIN") == "1"
_TEST = {"name": None}


def _log(record: dict) -> None:
    if _LOG:
        with open(_LOG, "a") as file:
            file.write(json.dumps({"test": _TEST["name"], **record}) + "\n")


def _tokens(output):
    return output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)


def _compare(twin, wrapped_generate, args, kwargs):
    """Run the call on the unwrapped twin, then wrapped, from the same random state. A call given a
    cache or a model (an assistant, perhaps the wrapped model itself) runs wrapped only: the twin
    would change the cache, or run the wrapped model."""
    if any(isinstance(value, (Cache, torch.nn.Module)) for value in kwargs.values()):
        return wrapped_generate(*args, **kwargs)
    state = torch.get_rng_state()
    try:
        expected = _ORIGINAL(twin, *args, **dict(kwargs))
    except Exception as error:  # stock raises too: the wrapped call is expected to
        expected = error
    torch.set_rng_state(state)
    got = wrapped_generate(*args, **kwargs)
    if isinstance(expected, Exception):
        _log({"event": "stock raised, wrapped did not", "error": repr(expected)[:300]})
    else:
        same = torch.equal(_tokens(got), _tokens(expected)) if _tokens(got) is not None else None
        if not same:
            _log({"event": "tokens differ", "stock": str(_tokens(expected).tolist())[:300],
                  "wrapped": str(None if _tokens(got) is None else _tokens(got).tolist())[:300]})
    return got


def _generate(self, *args, **kwargs):
    if getattr(self, "hf_paged_runtime", None) is not None:  # already wrapped (its own generate ran): stock
        return _ORIGINAL(self, *args, **kwargs)
    twin = copy.deepcopy(self) if _TWIN else None
    try:
        hf_paged.wrap(self)
    except hf_paged.UnsupportedModelError as error:
        _log({"event": "refused", "model": type(self).__name__, "reason": str(error)[:300]})
        return _ORIGINAL(self, *args, **kwargs)
    wrapped = self.generate  # the instance's paged generate()
    if twin is not None:
        self.generate = lambda *a, **k: _compare(twin, wrapped, a, k)
        return self.generate(*args, **kwargs)
    return wrapped(*args, **kwargs)


def pytest_configure(config):
    GenerationMixin.generate = _generate


def pytest_runtest_setup(item):
    _TEST["name"] = item.nodeid
