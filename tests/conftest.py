"""Shared test setup: offline hub, the `gpu` marker, and process state (threads, Dynamo) reset around each test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the self-hosted GPU runner (gpu.yml)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Each test starts and ends with the process as the suite found it.

    scripts/eval.py's main() sets torch's intra-op threads to 1 (its timings need it); compiled code
    and Dynamo's recompile counts are per code object for the whole process, so a compile test would
    change which steps a later test compiles. The teardown runs whether the test passed or failed.
    """
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
