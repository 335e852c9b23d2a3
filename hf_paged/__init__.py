"""hf_paged: a paged KV cache with beam page sharing for Hugging Face transformers' generate()."""

from .cache import PagedCache
from .config import PagedConfig
from .errors import OutOfPagesError, UnsupportedModelError
from .stats import clear_prefix_cache, memory_stats
from .wrap import unwrap, wrap

__all__ = [
    "OutOfPagesError",
    "PagedCache",
    "PagedConfig",
    "UnsupportedModelError",
    "clear_prefix_cache",
    "memory_stats",
    "unwrap",
    "wrap",
]
__version__ = "0.1.0"
