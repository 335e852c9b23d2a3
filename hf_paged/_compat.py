"""The one place that knows how the supported transformers releases differ (5.23 to the newest 5.x).

Everything else asks this module. Differences are detected by capability (what a signature takes,
what an output class declares), not by version strings; the version only goes into messages.

Known differences:
- 5.24 renamed the cache argument of every model's `forward` from `past_key_values` to `cache`,
  and the output field the same way (`outputs.cache`). `generate()` and model forwards still
  accept `past_key_values=` as a deprecated alias that they rename before use; forward hooks,
  which see the keywords before that rename, may meet either name.
- Output classes of 5.24 read and write `past_key_values` as an alias of `cache`; 5.23's have no
  `cache` field.
- 5.24 moved GPT-J and CodeGen onto transformers' attention interface (5.23's attention modules
  compute scores themselves). Whether a family routes through the interface is read off its
  modeling source (`routes_through_interface`); hf_paged.patches serves the families that do not.
- 5.24 added `crop`, `is_croppable` and `is_compileable` to more cache *layer* classes. PagedCache
  keeps no layers (`layers=[]`) and defines every `Cache` method itself, so those additions need
  nothing here.
- 5.25 passes `recurrent_states_to_keep=` to `Cache.activate_past_recording` (assisted and
  prompt-lookup decoding) and added `Cache.get_recurrent_states_to_keep`; PagedCache takes and
  answers both (tests/test_compat.py fails when a release adds a `Cache` member PagedCache does not
  define). 5.25 also moved Falcon onto the attention interface (`routes_through_interface`), with
  ALiBi added to the attention mask; ALiBi Falcon stays refused (hf_paged.integration.refusals).

Which releases are tested is said once, in pyproject.toml's transformers requirement (capped at the
newest minor the suite passed on); `tested_transformers()` reads it from the installed package's
metadata, and wrap() warns once when the installed release lies outside it.
"""

import importlib.metadata
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any

import transformers
from packaging.requirements import Requirement
from transformers.modeling_outputs import CausalLMOutputWithPast

TRANSFORMERS_VERSION: str = transformers.__version__


def tested_transformers() -> str | None:
    """The transformers releases hf_paged was tested on, as its installed metadata requires them
    (for example ">=5.23,<5.26"), or None when hf_paged runs from a folder that was never installed."""
    try:
        requirements = importlib.metadata.requires("hf_paged") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is None:
            return ",".join(sorted(map(str, requirement.specifier), reverse=True))  # ">=5.23,<5.26"
    return None


TESTED = tested_transformers()
TESTED_RANGE = f"transformers{TESTED}" if TESTED else "the releases in its pyproject.toml"
_warned_untested = False


def warn_if_untested(version: str | None = None) -> bool:
    """Warn once per process when `version` (the installed release by default) lies outside the
    tested range; True if it does."""
    global _warned_untested
    version = version or TRANSFORMERS_VERSION
    if TESTED is None or Requirement(f"transformers{TESTED}").specifier.contains(version, prereleases=True):
        return False
    if not _warned_untested:
        _warned_untested = True
        warnings.warn(
            f"transformers {version} is installed, but hf_paged was tested on {TESTED_RANGE}: wrap() raises "
            "UnsupportedModelError where a hook it needs is gone, but a changed mask or cache rule could go unseen. "
            f"Install a tested release (pip install \"transformers{TESTED}\") or check your model's tokens "
            "against the unwrapped model.",
            UserWarning,
            stacklevel=3,
        )
    return True

# Every name a model's forward has taken its KV cache under, newest first.
CACHE_ARG_NAMES = ("cache", "past_key_values")

# The field under which model outputs (and generate()'s dict outputs) carry the cache.
OUTPUT_CACHE_FIELD: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_arg_name(forward: Callable) -> str | None:
    """The keyword under which `forward` takes the KV cache ("cache" or "past_key_values"), or None."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARG_NAMES if name in parameters), None)


def model_cache_arg(model: Any) -> str:
    """The keyword under which `model.forward` and `model.generate` take the cache.

    A model whose forward names neither is given the installed release's own name.
    """
    return cache_arg_name(model.forward) or OUTPUT_CACHE_FIELD


def find_cache(arguments: dict[str, Any]) -> Any:
    """The cache in a forward's bound arguments, under whichever name it was passed.

    `arguments` is `Signature.bind_partial(...).arguments`: a deprecated name that the signature
    does not declare sits in the dict of its `**kwargs` parameter.
    """
    for name in CACHE_ARG_NAMES:
        if arguments.get(name) is not None:
            return arguments[name]
    for value in arguments.values():
        if isinstance(value, dict):
            for name in CACHE_ARG_NAMES:
                if value.get(name) is not None:
                    return value[name]
    return None


def user_cache(kwargs: dict[str, Any]) -> Any:
    """A cache the caller passed to generate() under any accepted name, or None."""
    return next((kwargs[name] for name in CACHE_ARG_NAMES if kwargs.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a model output or a generate() dict output carries, or None."""
    for name in CACHE_ARG_NAMES:
        value = getattr(output, name, None) if not isinstance(output, dict) else output.get(name)
        if value is not None:
            return value
    return None


def set_output_cache(output: Any, cache: Any) -> None:
    """Replace the cache a model output carries (under the installed release's field)."""
    setattr(output, OUTPUT_CACHE_FIELD, cache)


def resolve_generation_config(model: Any, generation_config: Any, kwargs: dict[str, Any]) -> Any:
    """The GenerationConfig a `model.generate(generation_config=..., **kwargs)` call will run with.

    Merged the way generate() merges it (the passed config, else the model's own
    `model.generation_config`, then global defaults, then the keyword overrides), by asking
    transformers: `_prepare_generation_config` is private but identical in 5.23 to 5.25.
    generate()'s own named parameters (streamer, logits_processor, ...) are left out, as
    generate() itself never passes them to the merge.
    """
    named = inspect.signature(type(model).generate).parameters
    settings = {name: value for name, value in kwargs.items() if name not in named}
    return model._prepare_generation_config(generation_config, **settings)[0]


def layer_windows(config: Any, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (tokens a query sees) as stock's `DynamicCache(config=...)` keeps
    it (`get_layer_types_and_kwargs`), or None for a layer that keeps every token."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    except (ImportError, AttributeError, TypeError, ValueError):
        return [None] * num_layers
    if len(layer_types) != num_layers:
        return [None] * num_layers
    windows: list[int | None] = []
    for kind, kwargs in zip(layer_types, layer_kwargs):
        window = kwargs.get("sliding_window") if kind == "sliding_attention" else None
        windows.append(window if isinstance(window, int) and window > 0 else None)
    return windows


def routes_through_interface(module: Any) -> bool:
    """Whether the modeling code of `module`'s class (a model or a layer) calls attention through
    transformers' `ALL_ATTENTION_FUNCTIONS` (which hf_paged's registered function then serves)."""
    source = inspect.getsource(sys.modules[type(module).__module__])
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in source


def attn_implementation(config: Any) -> str | None:
    """`config._attn_implementation`, read per forward: PreTrainedConfig's attribute lookup costs
    microseconds (its `__getattribute__` maps attribute names), so the attribute behind its property
    (5.23 to 5.25) is read from the instance's dict directly where it exists."""
    if config is None:
        return None
    found = object.__getattribute__(config, "__dict__").get("_attn_implementation_internal", _MISSING)
    return getattr(config, "_attn_implementation", None) if found is _MISSING else found


_MISSING = object()
