"""Shared test setup: offline hub, deterministic CPU threads, the `gpu` marker."""

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
