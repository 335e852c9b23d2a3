"""PagedConfig: how big the page pool is, how pages are laid out, which executor runs."""

from dataclasses import dataclass, fields, replace

BACKENDS = ("auto", "torch", "flashinfer")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")  # vLLM's names (memory/kv_quant.py)

# Defaults for the pool when neither num_pages nor max_memory is given. On CPU the pool is
# allocated with torch.empty, so pages cost resident memory only once a request writes them;
# on CUDA the whole pool is reserved up front, so leave room for activations and logits.
DEFAULT_CPU_FRACTION = 0.2
DEFAULT_CUDA_FRACTION = 0.5

# How the pool chooses PagedConfig.window_page_size when it is None (memory/layout.py, memory/pool.py).
# The PagedConfig docstring, eval.py --help, README.md and docs/how-it-works.md say it in these
# words; tests/test_docs.py checks each example against the pool's choice.
WINDOW_PAGE_SIZE_RULE = (
    "None: the largest page size at which a sliding-window group's layers fit side by side into the bytes that "
    "one page id holds in the full-attention layers (memory/layout.py, first fit on each device): with pages of "
    "16 and one head shape, one sliding layer per full layer gets pages of 16, two get 8, three get 5, five get 3. "
    "With the prefix cache on, where the least common multiple of page_size and the groups' page sizes would "
    "exceed 4 x page_size, the largest divisor of page_size that fits instead (three per full layer: 4; five: "
    "still 3, as lcm(16, 3) = 48). A model without full-attention layers, or a group that does not fit even at "
    "pages of 1, takes the largest divisor of page_size that is at most window // 32 (at least 1: window 128 "
    "gets 4, 256 gets 8, 512 and more page_size); without full layers, the other windows' groups then fit into "
    "that group's pages as above. A value given is every sliding group's page size and must divide page_size."
)


@dataclass(slots=True)
class PagedConfig:
    """Settings for `hf_paged.wrap`.

    page_size: token slots per page (FlashInfer and vLLM use 16).
    window_page_size: token slots per page in the sliding-window groups of a model with windowed
        layers (memory/groups.py). A sliding layer holds its window plus the unused part of the page
        at each end of it, so smaller pages there keep its KV close to stock's window-only cache.
        None: the largest page size at which a sliding-window group's layers fit side by side into
        the bytes that one page id holds in the full-attention layers (memory/layout.py, first fit
        on each device): with pages of 16 and one head shape, one sliding layer per full layer gets
        pages of 16, two get 8, three get 5, five get 3. With the prefix cache on, where the least
        common multiple of page_size and the groups' page sizes would exceed 4 x page_size, the
        largest divisor of page_size that fits instead (three per full layer: 4; five: still 3, as
        lcm(16, 3) = 48). A model without full-attention layers, or a group that does not fit even
        at pages of 1, takes the largest divisor of page_size that is at most window // 32 (at
        least 1: window 128 gets 4, 256 gets 8, 512 and more page_size); without full layers, the
        other windows' groups then fit into that group's pages as above. A value given is every
        sliding group's page size and must divide page_size.
    num_pages: pages in the pool. Takes precedence over `max_memory`.
    max_memory: pool budget, in bytes (int > 1) or as a fraction of the device's free memory
        (float in (0, 1], like vLLM's gpu_memory_utilization). None: 0.2 of available RAM on
        CPU, 0.5 of free memory on CUDA.
    backend: "auto" (FlashInfer for fp16/bf16 on CUDA when installed, else torch), "torch",
        or "flashinfer".
    cascade: attend a prefix shared by several rows once per group (shared-prefix attention).
        None: on for the torch executor (measured on CPU), off for FlashInfer (its cascade path
        has not been run on a GPU yet; pass True to use it).
    compile: run decode steps through a compiled forward (docs/compile.md).
    prefix_cache: keep the full pages of every prompt after a call and reuse them for later prompts
        that start with the same tokens (docs/prefix-caching.md). Off by default: K/V reused
        from another call were computed in another batch shape, which can move fp32 results by
        rounding, and hf_paged promises stock's tokens.
    exact: compute as stock does, so that fp32 logits equal stock's bit for bit in every decoding
        mode (docs/numerics.md): each row's prompt is prefilled with the whole batch as stock
        prefills it (not once per input), no shared-prefix attention, and stock's query layout in
        every decode step (the torch executor; "auto" picks it). Without it, fp32 logits are
        stock's bit for bit except where rows share a prompt (beams, several sequences per prompt)
        and, on grouped-query models, in decode steps of unpadded batches (a few units in the last
        place; order can differ at near-ties). Costs the prompt's compute and KV per row, as stock.
    """

    page_size: int = 16
    window_page_size: int | None = None
    num_pages: int | None = None
    max_memory: int | float | None = None
    backend: str = "auto"
    cascade: bool | None = None
    compile: bool = False
    prefix_cache: bool = False
    exact: bool = False
    kv_cache_dtype: str = "auto"
    kv_scales: tuple | list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"expected page_size to be an int >= 1, got {self.page_size!r}")
        if self.window_page_size is not None and (
            isinstance(self.window_page_size, bool)
            or not isinstance(self.window_page_size, int)
            or self.window_page_size < 1
            or self.page_size % self.window_page_size
        ):
            raise ValueError(
                f"expected window_page_size to be None or an int >= 1 that divides page_size={self.page_size}, "
                f"got {self.window_page_size!r}"
            )
        if self.num_pages is not None and (
            isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int) or self.num_pages < 1
        ):
            raise ValueError(f"expected num_pages to be an int >= 1 or None, got {self.num_pages!r}")
        if self.max_memory is not None:
            ok_fraction = isinstance(self.max_memory, float) and 0.0 < self.max_memory <= 1.0
            ok_bytes = isinstance(self.max_memory, int) and not isinstance(self.max_memory, bool) and self.max_memory > 1
            if not (ok_fraction or ok_bytes):
                raise ValueError(
                    "expected max_memory to be a byte count (int > 1) or a fraction of free memory "
                    f"(float in (0, 1]), got {self.max_memory!r}"
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"expected backend to be one of {BACKENDS}, got {self.backend!r}")
        if self.cascade is not None and not isinstance(self.cascade, bool):
            raise ValueError(f"expected cascade to be True, False or None, got {self.cascade!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"expected compile to be True or False, got {self.compile!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"expected prefix_cache to be True or False, got {self.prefix_cache!r}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"expected exact to be True or False, got {self.exact!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"expected kv_cache_dtype to be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_scales is not None:
            if self.kv_cache_dtype == "auto":
                raise ValueError(
                    "kv_scales needs fp8 pages: pass kv_cache_dtype='fp8_e4m3' or 'fp8_e5m2' with it, or drop kv_scales"
                )
            self.kv_scales = _check_scales(self.kv_scales)
        if self.exact:
            conflicts = [
                text for text, on in (
                    ("cascade=True (shared-prefix attention merges two partial softmaxes)", self.cascade),
                    ("prefix_cache=True (reused K/V were computed in another batch shape)", self.prefix_cache),
                    ("backend='flashinfer' (its kernels add in another order than stock's SDPA)", self.backend == "flashinfer"),
                    ("compile=True (a compiled decode step fuses stock's operations)", self.compile),
                    (f"kv_cache_dtype={self.kv_cache_dtype!r} (fp8 pages round every key and value)",
                     self.kv_cache_dtype != "auto"),
                ) if on
            ]
            if conflicts:
                raise ValueError(
                    "expected exact=True alone, got it with " + "; ".join(conflicts)
                    + ": these cannot compute as stock does; drop them or exact"
                )

    def with_overrides(self, **overrides) -> "PagedConfig":
        """A copy with some fields replaced; unknown names raise TypeError listing the valid ones."""
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown PagedConfig field(s) {unknown}; expected some of {sorted(valid)}")
        return replace(self, **overrides)


def _check_scales(scales) -> tuple:
    """PagedConfig.kv_scales as a tuple: one (k, v) pair of floats, or a tuple of such pairs (one per layer)."""

    def pair(item) -> tuple[float, float] | None:
        if isinstance(item, (tuple, list)) and len(item) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf") for x in item
        ):
            return float(item[0]), float(item[1])
        return None

    one = pair(scales)
    if one is not None:
        return one
    many = [pair(item) for item in scales] if isinstance(scales, (tuple, list)) and scales else [None]
    if any(item is None for item in many):
        raise ValueError(
            "expected kv_scales to be a (k_scale, v_scale) pair of positive finite numbers, or a list of one "
            f"such pair per layer, got {scales!r}"
        )
    return tuple(many)
