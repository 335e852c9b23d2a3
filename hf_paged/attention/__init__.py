"""One contract, two executors: the one dispatch point that picks which runs.

An executor has `plan(meta, params, pool) -> plan` (once per forward and distinct layer setting)
and `run(q [nnz, H_q, D], layer_pool, plan) -> [nnz, H_q, D]` (once per layer). Both read
exactly the ForwardMetadata; neither gets information the other lacks.
"""

from typing import Protocol

import torch

from ..metadata import ForwardMetadata
from ..pool import KVPool, LayerSpec
from . import torch_backend
from .params import LayerParams

__all__ = ["Executor", "LayerParams", "TorchExecutor", "select_executor"]


class Executor(Protocol):
    name: str

    def plan(self, meta: ForwardMetadata, params: LayerParams, pool: KVPool) -> object: ...

    def run(self, q: torch.Tensor, layer_pool: torch.Tensor, plan: object) -> torch.Tensor: ...


class TorchExecutor:
    """The pure-PyTorch executor (any device, any dtype)."""

    name = "torch"

    def plan(self, meta: ForwardMetadata, params: LayerParams, pool: KVPool) -> torch_backend.TorchPlan:
        return torch_backend.plan(meta, params, pool.zero_page_id)

    def run(self, q: torch.Tensor, layer_pool: torch.Tensor, plan: torch_backend.TorchPlan) -> torch.Tensor:
        return torch_backend.run(q, layer_pool, plan)


def select_executor(backend: str, specs: list[LayerSpec]) -> Executor:
    """The executor for `backend` ("auto", "torch", "flashinfer") for layers of these devices and dtypes.

    "auto" picks FlashInfer for float16/bfloat16 models on CUDA with a head dim of 64, 128 or 256
    when flashinfer imports, else torch. "flashinfer" raises ValueError naming every reason it
    cannot serve the model (fp32, CPU, head dim, not installed). Allocates nothing.
    """
    if backend == "torch":
        return TorchExecutor()
    if backend not in ("auto", "flashinfer"):
        raise ValueError(f"expected backend to be 'auto', 'torch' or 'flashinfer', got {backend!r}")
    from . import flashinfer_support

    reasons = flashinfer_support.unsupported_reasons(specs)
    if backend == "flashinfer" or not reasons:  # "auto" imports FlashInfer only when it would use it
        reasons += flashinfer_support.import_reasons()
    if not reasons:
        from .flashinfer_backend import FlashInferExecutor

        return FlashInferExecutor()
    if backend == "flashinfer":
        raise ValueError("backend='flashinfer' cannot serve this model: " + "; ".join(reasons))
    return TorchExecutor()
