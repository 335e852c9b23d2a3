"""Which executor runs: select_executor's choices and messages, without a GPU and without FlashInfer.

A fake GPU (`fake_gpu`) stands in for CUDA where the checks ask about it; FlashInfer itself is
never needed (where a test needs it importable it says so, or blocks it).
"""

import subprocess
import sys
import types

import pytest
import torch

import hf_paged
from hf_paged.attention import TorchExecutor, select_executor
from hf_paged.attention.flashinfer import support as flashinfer_support
from hf_paged.attention.flashinfer.executor import FlashInferExecutor
from hf_paged.memory.pool import LayerSpec

from tiny import tiny_model


def layer_specs(*specs: LayerSpec) -> list[LayerSpec]:
    return list(specs)


def spec(device="cuda:0", dtype=torch.bfloat16, head_dim=128) -> LayerSpec:
    return LayerSpec(num_kv_heads=2, head_dim=head_dim, device=torch.device(device), dtype=dtype)


def fake_flashinfer() -> types.ModuleType:
    """An importable `flashinfer` (select_executor only imports it; nothing here plans or runs)."""
    return types.ModuleType("flashinfer")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 as far as the backend checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_explicit_flashinfer_on_fp32_cpu_model_raises_before_touching_the_model():
    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError) as error:
        hf_paged.wrap(model, num_pages=8, backend="flashinfer")
    message = str(error.value)
    assert "FlashInfer has no fp32 kernels; use backend='torch' or load the model in bfloat16/float16" in message
    assert "cpu" in message and "CUDA" in message
    assert not hasattr(model, "hf_paged_runtime") and model.config._attn_implementation == implementation
    assert "generate" not in model.__dict__


def test_explicit_flashinfer_on_bf16_cpu_model_names_the_device_only():
    with pytest.raises(ValueError, match="layers on cpu; FlashInfer runs on CUDA GPUs only") as error:
        select_executor("flashinfer", layer_specs(spec("cpu")))
    assert "fp32" not in str(error.value) and "head dim" not in str(error.value)


def test_explicit_flashinfer_with_unsupported_head_dim_raises(fake_gpu):
    with pytest.raises(ValueError, match=r"head dim 80 is not supported .*64, 128, 256") as error:
        select_executor("flashinfer", layer_specs(spec(head_dim=128), spec(head_dim=80)))
    assert "fp32" not in str(error.value) and "cpu" not in str(error.value)


def test_explicit_flashinfer_without_flashinfer_installed_raises(monkeypatch, fake_gpu):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer` fail
    with pytest.raises(ValueError, match=r"pip install 'hf_paged\[flashinfer\]'"):
        select_executor("flashinfer", layer_specs(spec()))
    assert isinstance(select_executor("auto", layer_specs(spec())), TorchExecutor)


def test_bfloat16_needs_compute_capability_8(monkeypatch, fake_gpu):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match="compute capability 7.5"):
        select_executor("flashinfer", layer_specs(spec(dtype=torch.bfloat16)))
    assert isinstance(select_executor("auto", layer_specs(spec(dtype=torch.bfloat16))), TorchExecutor)
    assert isinstance(select_executor("auto", layer_specs(spec(dtype=torch.float16))), FlashInferExecutor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_auto_picks_flashinfer_for_16_bit_cuda_models(monkeypatch, fake_gpu, dtype, head_dim):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer())
    specs = layer_specs(spec(dtype=dtype, head_dim=head_dim))
    assert isinstance(select_executor("auto", specs), FlashInferExecutor)
    assert isinstance(select_executor("flashinfer", specs), FlashInferExecutor)
    assert isinstance(select_executor("torch", specs), TorchExecutor)


@pytest.mark.parametrize(
    "specs",
    [layer_specs(spec(dtype=torch.float32)), layer_specs(spec(head_dim=96)), layer_specs(spec("cpu")),
     layer_specs(spec(), spec("cpu"))],
    ids=["fp32", "head_dim_96", "cpu", "partly_offloaded"],
)
def test_auto_falls_back_to_torch_without_importing_flashinfer(monkeypatch, fake_gpu, specs):
    def no_import():
        raise AssertionError("auto imported flashinfer although it cannot be used")

    monkeypatch.setattr(flashinfer_support, "import_reasons", no_import)
    assert isinstance(select_executor("auto", specs), TorchExecutor)


def test_auto_on_a_cpu_model_wraps_with_the_torch_executor():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=8)
    assert isinstance(model.hf_paged_runtime.executor, TorchExecutor)


@pytest.mark.subprocess
def test_import_hf_paged_does_not_import_flashinfer():
    code = "import sys, hf_paged; assert 'flashinfer' not in sys.modules, 'flashinfer imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
