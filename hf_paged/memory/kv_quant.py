"""fp8 KV pages: the storage dtypes, each layer's K and V scales, quantized writes, counted clamps.

`PagedConfig(kv_cache_dtype="fp8_e4m3" | "fp8_e5m2")` stores keys and values in one byte each.
Every layer has one scale for its keys and one for its values, the form FlashInfer's
`run(k_scale=, v_scale=)` takes: a page holds `clamp(x / scale, -max, max)` in fp8 and is read as
`stored * scale` (FlashInfer folds k_scale into the softmax scale and applies v_scale to the output,
the same values).

Where a layer's scales come from, the first that applies (docs/fp8.md):

1. `PagedConfig(kv_scales=...)`: one (k, v) pair for every layer, or one pair per layer.
2. The checkpoint's: `k_scale` / `v_scale` on the layer's attention module (what a compressed-tensors
   / llm-compressor checkpoint loads there; `checkpoint_scales` reads them from the files).
3. The first forward that writes the layer: `amax(|K|) * HEADROOM / max` (V alike), so the largest
   value of that forward lands at 1/HEADROOM of the fp8 range and later ones up to HEADROOM times
   larger still fit. A K or V that is all zeros gets scale 1.

A layer's scales never change once set, for as long as its pool lives (the prefix cache's pages
live in that pool, so a cached page is always read with the scales it was written with). Values
beyond the range are clamped to +-max (never inf or NaN: e5m2 would round them to inf) and counted
per layer (`clamped_values`, in memory_stats). No torch in the rules above beyond this module's
functions; the cache calls `quantize` in every layer's write.
"""

import re
import threading
from pathlib import Path

import torch

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
HEADROOM = 2.0


def storage_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The page dtype of PagedConfig.kv_cache_dtype; None for "auto" (the model's dtype)."""
    return FP8_DTYPES.get(kv_cache_dtype)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A one-byte float tensor as uint8 (a view): CPU torch has no index_copy_ for fp8, bytes copy exactly."""
    return tensor.view(torch.uint8) if tensor.dtype in FP8_DTYPES.values() else tensor


def module_scales(module: torch.nn.Module) -> tuple[float, float] | None:
    """A checkpoint's (k_scale, v_scale) on an attention module (compressed-tensors names), or None."""
    k, v = getattr(module, "k_scale", None), getattr(module, "v_scale", None)
    if k is None or v is None:
        return None
    values = [float(x.detach().float().reshape(-1)[0]) if isinstance(x, torch.Tensor) else float(x) for x in (k, v)]
    return (values[0], values[1]) if all(0 < x < float("inf") for x in values) else None


_SCALE_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|attention|attn)\.([kv])_scale$")


def checkpoint_scales(path: str | Path) -> list[tuple[float, float]]:
    """(k_scale, v_scale) per layer from a checkpoint's safetensors files (a file or a folder): the
    `model.layers.N.self_attn.k_scale` / `v_scale` tensors of compressed-tensors / llm-compressor
    checkpoints, for `PagedConfig(kv_scales=...)`. ValueError when a layer lacks one of them."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    found: dict[int, dict[str, float]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                match = _SCALE_KEY.search(key)
                if match:
                    found.setdefault(int(match[1]), {})[match[2]] = float(handle.get_tensor(key).float().reshape(-1)[0])
    layers = sorted(found)
    if not layers or layers != list(range(len(layers))) or any(len(found[i]) != 2 for i in layers):
        raise ValueError(
            f"{path} holds no k_scale and v_scale for every layer (found layers {layers}); "
            "pass kv_scales=(k, v) yourself, or leave it None for scales from the first forward"
        )
    return [(found[i]["k"], found[i]["v"]) for i in layers]


class KVQuant:
    """The scales and clamp counts of one pool's fp8 layers.

    `scales[i]`: layer i's (k_scale, v_scale) floats, None until set. `clamped[i]`: `[2]` int64 on
    layer i's device, keys and values clamped so far (a device tensor: counting needs no host sync).
    """

    def __init__(self, dtype: torch.dtype, devices: list[torch.device], given: tuple | None = None):
        self.dtype = dtype
        self.max = float(torch.finfo(dtype).max)
        self.lock = threading.Lock()
        num_layers = len(devices)
        if given is not None and isinstance(given[0], tuple) and len(given) != num_layers:
            raise ValueError(f"kv_scales has {len(given)} pairs but the model has {num_layers} attention layers")
        self.scales: list[tuple[float, float] | None] = [
            None if given is None else (given[i] if isinstance(given[0], tuple) else given) for i in range(num_layers)
        ]
        self.clamped = [torch.zeros(2, dtype=torch.int64, device=device) for device in devices]

    def set_scales(self, layer: int, key: torch.Tensor, value: torch.Tensor,
                   module: torch.nn.Module | None = None) -> tuple[float, float]:
        """Layer `layer`'s scales, set on its first write: the module's (checkpoint), else from
        this write's amax (the module docstring's rule). One host sync, once per layer."""
        with self.lock:  # two threads' first forwards: the first sets, the other reads it
            if self.scales[layer] is None:
                found = module_scales(module) if module is not None else None
                self.scales[layer] = found or (self._from_amax(key), self._from_amax(value))
            return self.scales[layer]

    def _from_amax(self, x: torch.Tensor) -> float:
        amax = float(x.detach().abs().amax()) if x.numel() else 0.0
        return amax * HEADROOM / self.max if 0 < amax < float("inf") else 1.0

    def quantize(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`key`, `value` (any shape, model dtype) in the pool's dtype under layer `layer`'s scales
        (set first with `set_scales`); clamps are counted."""
        k_scale, v_scale = self.scales[layer]
        count = self.clamped[layer]
        return quantize(key, k_scale, self.dtype, self.max, count[0]), quantize(value, v_scale, self.dtype, self.max, count[1])

    def round_trip(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`key`, `value` as the pages return them (quantized and dequantized, in their dtype), for
        attention from a forward's own K/V (cache/inflight.py); clamps are counted by the write only."""
        scratch = torch.zeros((), dtype=torch.int64, device=key.device)
        return tuple(
            dequantize(quantize(x, scale, self.dtype, self.max, scratch), x.dtype, scale)
            for x, scale in zip((key, value), self.scales[layer])
        )

    def clamped_values(self) -> int:
        """Keys and values clamped so far over every layer (one host read per device)."""
        return sum(int(count.sum()) for count in self.clamped)


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype, limit: float, count: torch.Tensor) -> torch.Tensor:
    """`clamp(x / scale, -limit, limit)` in `dtype` (computed in float32); adds the clamped values to `count` (0-d)."""
    scaled = x.float() / scale
    count.add_(torch.count_nonzero(scaled.abs() > limit))
    return scaled.clamp_(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Stored fp8 `x` as `dtype` values (`x * scale`): what the torch executor attends to.

    Through float16, whose conversions torch vectorizes (fp8's own run element by element on CPU:
    several times slower). e5m2 is float16's top byte. e4m3's sign and 7 exponent-mantissa bits,
    moved into float16's, are the value / 256 exactly, subnormals included (exponent bias 15 against
    7): the 256 goes into the scale, a power of two, so the result is the same to the bit. (The e4m3
    NaN code reads as 480: pages never hold it, writes clamp, but a NaN key stays NaN only in stock.)
    """
    if x.dtype == torch.float8_e4m3fn:
        bits = x.view(torch.int8).to(torch.int16)  # sign-extended: bits 8-15 repeat the sign
        half = bits.bitwise_left_shift_(7).bitwise_and_(-16512).view(torch.float16)  # 0xBF80: sign, 7 bits
        scale *= 256.0
    elif x.dtype == torch.float8_e5m2:
        half = x.to(torch.float16)
    else:
        return x.to(dtype) * scale
    out = half.to(dtype)  # a new tensor: scaling it in place leaves the pages alone
    return out if scale == 1.0 else out.mul_(scale)
