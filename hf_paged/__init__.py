"""hf_paged: a paged KV cache with beam page sharing for Hugging Face transformers' generate()."""

import importlib.util
import os
import sys


def _load_source_patches() -> None:
    """Run from a source checkout (not installed), import the top-level patches/ folder as
    `hf_paged.patches`, the name an install gives it (see setup.py)."""
    if importlib.util.find_spec(f"{__name__}.patches") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.patches", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    if spec is None:
        raise ImportError(f"hf_paged.patches is neither installed nor in the source checkout ({folder})")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    globals()["patches"] = module  # as an installed subpackage would be: hf_paged.patches


_load_source_patches()

from .cache.paged_cache import PagedCache
from .config import PagedConfig
from .errors import OutOfPagesError, UnsupportedModelError
from .integration.stats import clear_prefix_cache, memory_stats
from .integration.wrap import unwrap, wrap

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
