"""Attention: one contract (FlashInfer's paged format), two executors, one dispatch point.

May import: `memory` and the root modules; never `cache` or `integration`.

Layout (imports point down this list only; tests/test_imports.py checks there is no cycle):

- metadata.py: ForwardMetadata, the per-forward page lists and index tensors both executors read.
- params.py: LayerParams, the per-layer settings a plan is made for.
- executor.py: the Executor protocol and the capabilities executors declare.
- prefix.py: shared prefixes (group finding, when cascade pays, suffix metadata); a leaf.
- torch/: the pure-PyTorch executor: dense.py (plain path: plan and run), masks.py (index and
  mask tensors), reads.py (K/V out of the pool: views and gathers), cascade.py (shared prefixes).
- flashinfer/: the CUDA executor: support.py (can it serve the model), args.py (FlashInfer call
  arguments), cascade.py, graph.py (CUDA-graph decode steps), executor.py.
- ops.py: the executors as `torch.library` custom ops for compiled decode steps, with the
  registry of op runners.
"""

import warnings

from ..memory.pool import LayerSpec
from .executor import Executor
from .params import LayerParams
from .torch import TorchExecutor

__all__ = ["Executor", "LayerParams", "TorchExecutor", "select_executor"]


def select_executor(backend: str, specs: list[LayerSpec], exact: bool = False, torch_only: str | None = None) -> Executor:
    """The executor for `backend` ("auto", "torch", "flashinfer") for layers of these devices and dtypes.

    "auto" picks FlashInfer for float16/bfloat16 models on CUDA with a head dim of 64, 128 or 256
    when flashinfer imports, else torch. "flashinfer" raises ValueError naming every reason it
    cannot serve the model (fp32, CPU, head dim, not installed). `exact` (PagedConfig.exact): the
    torch executor computing as stock's SDPA does ("auto" then never picks FlashInfer, whose kernels
    add in another order; PagedConfig refuses "flashinfer" with it). `torch_only`: why only the
    torch executor serves this model (an encoder-decoder model's cross-attention and T5's position
    bias): "auto" picks it, "flashinfer" raises ValueError with the reason. Allocates nothing.
    """
    if torch_only is not None and backend == "flashinfer":
        raise ValueError(f"backend='flashinfer' cannot serve this model: {torch_only}; use backend='auto' or 'torch'")
    if backend == "torch" or exact or torch_only is not None:
        return TorchExecutor(exact=exact)
    if backend not in ("auto", "flashinfer"):
        raise ValueError(f"expected backend to be 'auto', 'torch' or 'flashinfer', got {backend!r}")
    from .flashinfer import support

    reasons = support.unsupported_reasons(specs)
    if backend == "flashinfer" or not reasons:  # "auto" imports FlashInfer only when it would use it
        reasons += support.import_reasons()
    if not reasons:
        from .flashinfer.executor import FlashInferExecutor

        return FlashInferExecutor()
    if backend == "flashinfer":
        raise ValueError("backend='flashinfer' cannot serve this model: " + "; ".join(reasons))
    if not support.unsupported_reasons(specs):  # FlashInfer would serve it: it is missing or broken
        _warn_torch_instead(reasons)
    return TorchExecutor()


_WARNED: set[str] = set()  # warn once per process and reason


def _warn_torch_instead(reasons: list[str]) -> None:
    """backend='auto' on a GPU model FlashInfer could serve, but flashinfer does not import."""
    message = "; ".join(reasons)
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(  # the reason ends with the install hint: pip install 'hf_paged[flashinfer]'
        f"hf_paged serves this CUDA model with its torch executor because FlashInfer is not available: {message}",
        stacklevel=4,
    )
