"""One contract, two executors: the one dispatch point that picks which runs.

An executor has `plan(meta, params, pool) -> plan` (once per forward and distinct layer setting)
and `run(q [nnz, H_q, D], layer_pool, plan) -> [nnz, H_q, D]` (once per layer). Both read
exactly the ForwardMetadata; neither gets information the other lacks.
"""

from typing import Protocol

import torch

from ..metadata import ForwardMetadata
from ..pool import KVPool
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


def select_executor(backend: str, pool: KVPool) -> Executor:
    """The executor for `backend` ("auto", "torch", "flashinfer") on this pool's devices and dtypes."""
    if backend in ("auto", "torch"):
        return TorchExecutor()
    raise ValueError(f"backend {backend!r} is not available yet; use backend='torch'")
