"""FlashInfer is an extra (`pip install "hf_paged[flashinfer]"`), not a dependency (issue 20): a
CPU install does not pull its CUDA wheels; on CUDA, wrap() says once that the torch executor runs
instead when it is missing; the GPU workflow installs it."""

import importlib.metadata
import pathlib
import re
import sys
import tomllib
import warnings

import pytest
import torch
import yaml

from hf_paged.attention import TorchExecutor, select_executor
from hf_paged.attention import _WARNED
from hf_paged.memory.pool import LayerSpec

ROOT = pathlib.Path(__file__).resolve().parent.parent


def name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_flashinfer_is_an_extra_in_pyproject_and_in_the_installed_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "flashinfer-python" not in {name(r) for r in project["dependencies"]}
    assert [name(r) for r in project["optional-dependencies"]["flashinfer"]] == ["flashinfer-python"]
    requirements = importlib.metadata.requires("hf_paged") or []
    flashinfer = [r for r in requirements if name(r) == "flashinfer-python"]
    assert flashinfer, "reinstall: pip install -e ."
    assert all('extra == "flashinfer"' in r for r in flashinfer), flashinfer  # never unconditional


def test_the_gpu_workflow_installs_the_flashinfer_extra():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu.yml").read_text())
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    installs = [line for run in steps for line in run.splitlines() if "pip install -e" in line]
    assert installs and all("flashinfer" in line for line in installs), installs


@pytest.fixture
def fake_gpu_without_flashinfer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer` fail
    saved = set(_WARNED)
    _WARNED.clear()
    yield
    _WARNED.clear()
    _WARNED.update(saved)


def specs(device="cuda:0", dtype=torch.bfloat16) -> list[LayerSpec]:
    return [LayerSpec(num_kv_heads=2, head_dim=128, device=torch.device(device), dtype=dtype)]


def test_auto_on_a_cuda_model_warns_once_when_flashinfer_is_missing(fake_gpu_without_flashinfer):
    with pytest.warns(UserWarning, match=r"torch executor because FlashInfer is not available.*hf_paged\[flashinfer\]"):
        assert isinstance(select_executor("auto", specs()), TorchExecutor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(select_executor("auto", specs()), TorchExecutor)  # once per process


def test_no_warning_where_flashinfer_would_not_run_anyway(fake_gpu_without_flashinfer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for layer_specs in (specs("cpu"), specs(dtype=torch.float32)):
            assert isinstance(select_executor("auto", layer_specs), TorchExecutor)
        assert isinstance(select_executor("torch", specs()), TorchExecutor)
