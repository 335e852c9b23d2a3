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
  nothing here; the container API (`Cache`'s methods) is the same in both releases.
"""

import inspect
import sys
from collections.abc import Callable
from typing import Any

import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

TRANSFORMERS_VERSION: str = transformers.__version__
# The releases the suite ran on (.ci/run runs it on both ends); pyproject.toml allows <6.
TESTED_RANGE = "transformers 5.23.0 to 5.24.0"

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
    transformers: `_prepare_generation_config` is private but identical in 5.23 and 5.24.
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
