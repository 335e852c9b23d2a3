"""Which models the FlashInfer executor can serve, and importing FlashInfer lazily.

`select_executor` (attention/__init__.py) asks `unsupported_reasons` (cheap, no import) and,
only when it would use FlashInfer or was told to, `import_reasons` (imports it: seconds).
"""

import importlib

import torch

from ...memory.pool import LayerSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# fp8 pages (PagedConfig.kv_cache_dtype): FlashInfer's FA2 prefill kernel, which also serves the
# decode wrapper with tensor cores, takes fp16/bf16 queries on e4m3 or e5m2 KV and dequantizes tiles
# in shared memory; its `produce_kv` notes "for fp8, this function doesn't work for head_dim = 64"
# (include/flashinfer/attention/prefill.cuh, 0.7.4). Layers of other head dims run on the torch
# executor instead (FlashInferExecutor.plan, per layer setting): docs/fp8.md.
FP8_HEAD_DIMS = (128, 256)


def serves_fp8(head_dim: int) -> bool:
    """Whether FlashInfer's kernels read fp8 pages of this head dim (else the torch executor does)."""
    return head_dim in FP8_HEAD_DIMS


def import_flashinfer():
    """The flashinfer module; ImportError with an install hint when it cannot be imported."""
    try:
        return importlib.import_module("flashinfer")
    except Exception as exc:  # a broken install can raise more than ImportError
        raise ImportError(
            f"flashinfer is not importable ({type(exc).__name__}: {exc}); install it with "
            "`pip install 'hf_paged[flashinfer]'` (Linux, CUDA) or use backend='torch'"
        ) from exc


def import_reasons() -> list[str]:
    """[] when `import flashinfer` works, else the reason (slow: a few seconds on first import)."""
    try:
        import_flashinfer()
    except ImportError as exc:
        return [str(exc)]
    return []


def unsupported_reasons(specs: list[LayerSpec]) -> list[str]:
    """Why FlashInfer cannot serve layers `specs`, one sentence each; [] when it can. No import."""
    reasons: list[str] = []
    devices = sorted({str(spec.device) for spec in specs if spec.device.type != "cuda"})
    if devices:
        reasons.append(
            f"the model has layers on {', '.join(devices)}; FlashInfer runs on CUDA GPUs only, "
            "so move the model to a GPU or use backend='torch'"
        )
    dtypes = {spec.dtype for spec in specs}
    if torch.float32 in dtypes or torch.float64 in dtypes:
        reasons.append("FlashInfer has no fp32 kernels; use backend='torch' or load the model in bfloat16/float16")
    elif dtypes - set(SUPPORTED_DTYPES):
        names = sorted(str(d).removeprefix("torch.") for d in dtypes - set(SUPPORTED_DTYPES))
        reasons.append(
            f"FlashInfer attention runs on float16/bfloat16 models, this one is {', '.join(names)}; "
            "use backend='torch' or load the model in bfloat16/float16"
        )
    head_dims = sorted({spec.head_dim for spec in specs} - set(SUPPORTED_HEAD_DIMS))
    if head_dims:
        reasons.append(
            f"head dim {', '.join(map(str, head_dims))} is not supported by FlashInfer's kernels "
            f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}); use backend='torch'"
        )
    if not devices:
        reasons.extend(_device_reasons(specs))
    return reasons


def _device_reasons(specs: list[LayerSpec]) -> list[str]:
    """CUDA present, and compute capability enough for the dtype (sm75; bf16 needs sm80)."""
    if not torch.cuda.is_available():
        return ["CUDA is not available in this process; use backend='torch'"]
    reasons = []
    for device in sorted({spec.device for spec in specs}, key=str):
        major, minor = torch.cuda.get_device_capability(device)
        needs = (8, 0) if any(s.dtype == torch.bfloat16 and s.device == device for s in specs) else (7, 5)
        if (major, minor) < needs:
            reasons.append(
                f"{device} has compute capability {major}.{minor}; FlashInfer needs "
                f"{needs[0]}.{needs[1]} for this dtype (bfloat16 needs 8.0); use backend='torch' or float16"
            )
    return reasons
