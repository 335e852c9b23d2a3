"""Tensor parallelism: a model sharded by transformers' own TP, one process per rank.

`from_pretrained(path, distributed_config=DistributedConfig(tp_size=N))` under `torchrun` (or
`accelerate launch`) shards the q/k/v projections column-wise, so each rank's attention sees its
local heads only, while `model.config` keeps the global counts. Each rank then has its own pool
of its local KV heads. The ranks run the same forwards on the same inputs, so their page tables
stay identical as long as three things hold, which this module sees to:

- every rank's pool has the same number of pages (the smallest any rank can afford: an
  all-reduce), so no rank runs out of pages while another waits in a collective;
- an error one rank raises where the others would go on into a collective (sizing and allocating
  the pool in `wrap()`, placing a forward's tokens before the forward runs) is raised on every
  rank: each such point all-reduces an ok-flag, so no rank hangs;
- the pool is sized from the heads a rank holds (`get_kv_heads_per_rank`, what transformers'
  own StaticCache uses); heads that do not divide by the TP size are refused (transformers would
  split a head across ranks, and stock attention fails on it too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from ..config import PagedConfig
from ..errors import UnsupportedModelError
from ..memory.groups import GroupSpec
from ..memory.pool import KVPool, LayerSpec, choose_num_pages, pool_layout

T = TypeVar("T")


class TensorParallelError(RuntimeError):
    """Raised on every rank of a TP group when another rank raised at a point where all must agree."""


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This process's place in the model's tensor-parallel group.

    `group`: the torch.distributed process group of the TP mesh dimension; `device`: where its
    collectives take tensors (cpu for gloo, this rank's GPU for NCCL).
    """

    rank: int
    size: int
    group: Any
    device: torch.device

    def all_reduce_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum of `values` over the group's ranks (int64)."""
        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return tensor.tolist()

    def agree(self, error: BaseException | None, where: str) -> None:
        """Every rank calls this at the same point: raise `error` here if it is set, and raise
        TensorParallelError on the ranks that had none if any rank had one (what failed, where)."""
        (failed,) = self.all_reduce_max([error is not None])
        if not failed:
            return
        # Rare path, taken by all ranks together: tell the others what failed.
        messages: list[Any] = [None] * self.size
        local = None if error is None else f"{type(error).__name__}: {error}"
        torch.distributed.all_gather_object(messages, local, group=self.group)
        if error is not None:
            raise error
        failures = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message)
        raise TensorParallelError(f"another rank of the tensor-parallel group failed {where} ({failures})")

    def run(self, step: Callable[[], T], where: str) -> T:
        """`step()` on this rank, then agree on whether every rank's call succeeded (`agree`)."""
        try:
            result = step()
        except BaseException as error:
            self.agree(error, where)
            raise  # unreachable: agree re-raises it
        self.agree(None, where)
        return result


def tp_group(model: torch.nn.Module) -> TPGroup | None:
    """The TP group of a model loaded with `distributed_config=DistributedConfig(tp_size>1)`, else None."""
    size = getattr(model, "_tp_size", None) or 1
    if size <= 1 or not torch.distributed.is_initialized():
        return None
    manager = getattr(model, "_mesh_manager", None)
    mesh = manager.get_mesh("tp") if manager is not None else model._device_mesh["tp"]
    group = mesh.get_group()
    device = torch.device("cpu")
    if "nccl" in str(torch.distributed.get_backend(group)):
        device = torch.device("cuda", torch.cuda.current_device())
    return TPGroup(rank=mesh.get_local_rank(), size=size, group=group, device=device)


def local_specs(model: torch.nn.Module, specs: list[LayerSpec], tp: TPGroup | None) -> list[LayerSpec]:
    """The specs with each layer's KV heads as this rank holds them (the global ones without TP).

    Raises UnsupportedModelError (before anything changes) when the KV heads do not divide by the
    TP size: transformers then splits a head across ranks and no pool shape is right.
    """
    if tp is None:
        return specs
    from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

    heads = [spec.num_kv_heads for spec in specs]
    local = get_kv_heads_per_rank(model.tp_plan, heads, tp.size)
    if local is None:
        counts = sorted(set(heads))
        sizes = [size for size in range(2, max(counts) + 1) if all(count % size == 0 for count in counts)]
        fix = f"load it with tp_size {' or '.join(map(str, sizes))}, or without" if sizes else "load it without"
        raise UnsupportedModelError(
            type(model).__name__,
            f"its {counts} KV heads per layer do not divide by tp_size={tp.size}: tensor parallelism "
            f"would split a head across ranks (stock attention fails on that too); {fix} tensor parallelism "
            "(for several processes, data parallelism: a model per process)",
        )
    return [replace(spec, num_kv_heads=h) for spec, h in zip(specs, local)]


def make_pool(config: PagedConfig, specs: list[LayerSpec], groups: list[GroupSpec], tp: TPGroup | None) -> KVPool:
    """The model's KVPool; under TP every rank gets the same number of pages, the smallest any rank
    can afford, and a rank that cannot size or allocate its pool makes every rank raise."""
    if tp is None:
        return KVPool(config, specs, groups)
    num_pages = tp.run(lambda: choose_num_pages(config, pool_layout(config, specs, groups)), "sizing its page pool")
    # The smallest over the ranks: the maximum of the negated counts (one all-reduce, op MAX).
    (negated,) = tp.all_reduce_max([-num_pages])
    agreed = config.with_overrides(num_pages=-negated)
    return tp.run(lambda: KVPool(agreed, specs, groups), "allocating its page pool")
