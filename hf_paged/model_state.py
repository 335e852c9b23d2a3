"""What the prefix cache's K/V were computed with: a key that changes when the model would compute other K/V.

The prefix cache (prefix_cache.py) compares this key at the start of every call that uses it and
empties itself when it changed, before anything is read. The key has three parts:

- **storage**: each parameter's and buffer's data pointer and in-place version counter (an
  optimizer step, `load_state_dict`, `copy_` under no_grad, `.to(...)`, a new or deleted parameter);
- **structure**: per module, its forward hooks and pre-hooks (handle ids: a hook added or removed),
  an instance-level `forward` (monkeypatching), `training` (dropout), and the state of a PEFT tuner
  layer (active adapters, disabled, merged adapters, scaling); the global module hooks too;
- **values**: a sample of every floating tensor's values (`SAMPLES_PER_TENSOR` evenly strided
  elements and the last one), because an edit through `.data` bumps no version counter.

Not detected: a `.data` edit that changes none of the sampled elements, a hook or forward whose
behaviour changes while it stays the same object (a steering vector edited in place), anything
that changes K/V outside the model's modules. `hf_paged.clear_prefix_cache(model)` covers those.
"""

import hashlib
import itertools

import torch
from torch.nn.modules import module as torch_module

SAMPLES_PER_TENSOR = 16  # strided samples per tensor; one gather and one host copy per (device, dtype)


def model_state_key(model: torch.nn.Module) -> tuple:
    """A hashable key of everything above; equal keys mean the same K/V for the same tokens."""
    tensors = [_local(t) for t in itertools.chain(model.parameters(), model.buffers())]
    storage = tuple((t.data_ptr(), t._version) for t in tensors)
    return storage, structure_key(model), values_fingerprint(tensors)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a model sharded by transformers' tensor parallelism), else the
    tensor: each rank keys its own prefix cache on the weights it computes with."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def structure_key(model: torch.nn.Module) -> tuple:
    """Hooks, instance-level forwards, training flags and PEFT adapter state of every module."""
    parts: list = [tuple(torch_module._global_forward_hooks), tuple(torch_module._global_forward_pre_hooks)]
    for module in model.modules():
        parts.append(
            (
                id(module),
                module.training,
                tuple(module._forward_hooks),
                tuple(module._forward_pre_hooks),
                _instance_forward(module),
                _adapter_state(module),
            )
        )
    return tuple(parts)


def _instance_forward(module: torch.nn.Module) -> int | None:
    """id of a forward replaced on the instance, else None. hf_paged's own (compile.CompiledDecode,
    installed while another thread's compiled call runs) computes the same K/V: not a change."""
    forward = module.__dict__.get("forward")
    if forward is None or type(forward).__module__.startswith(f"{__package__}."):
        return None
    return id(forward)


def _adapter_state(module: torch.nn.Module) -> tuple | None:
    """A PEFT tuner layer's state (duck-typed: peft need not be installed), else None."""
    if not (hasattr(module, "merged_adapters") and hasattr(module, "disable_adapters")):
        return None
    scaling = getattr(module, "scaling", None)
    return (
        repr(module.active_adapters),
        bool(module.disable_adapters),
        tuple(module.merged_adapters),
        repr(sorted(scaling.items())) if isinstance(scaling, dict) else repr(scaling),
    )


def values_fingerprint(tensors: list[torch.Tensor]) -> bytes:
    """A digest of `SAMPLES_PER_TENSOR + 1` values of every non-empty tensor (not on the meta device).

    Strided views are gathered by one `cat` per (device, dtype) and copied to the host once each, so
    the cost is a few kernels and a sync per call, not a read of the weights.
    """
    samples: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        numel = tensor.numel()
        if numel == 0 or tensor.is_meta:
            continue
        flat = tensor.detach()
        flat = flat.view(-1) if flat.is_contiguous() else flat.reshape(-1)
        step = max(1, numel // SAMPLES_PER_TENSOR)
        samples.setdefault((tensor.device, tensor.dtype), []).extend((flat[::step][:SAMPLES_PER_TENSOR], flat[-1:]))
    digest = hashlib.blake2b(digest_size=16)
    for (device, dtype), parts in samples.items():
        gathered = torch.cat(parts).cpu().contiguous()
        digest.update(f"{device}/{dtype}/{gathered.numel()}".encode())
        digest.update(gathered.view(torch.uint8).numpy().tobytes())
    return digest.digest()
