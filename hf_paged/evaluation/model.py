"""Load and place the model of an evaluation: a hub/local checkpoint, or the built-in tiny one."""

import json
import tempfile

import torch

from . import EvalError
from .default_model import DEFAULT_MODEL_NAME, byte_tokenizer, tiny_llama

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None) -> str | dict | None:
    """`--device-map`: a strategy ("auto", ...), one device ("cpu", "cuda:1", 0), or a JSON object."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvalError(f"--device-map is not valid JSON ({error}); expected e.g. '{{\"\": \"cpu\"}}'") from error
        if not isinstance(mapping, dict) or not mapping:
            raise EvalError("--device-map JSON must be a non-empty object of module name -> device")
        return mapping
    if text in DEVICE_MAP_STRATEGIES:
        return text
    return {"": int(text) if text.isdigit() else text}


def load_model(name: str | None, dtype: str, device: torch.device, device_map: str | dict | None, seed: int, tp: int = 1):
    """(model in eval mode, tokenizer with left padding and a pad token, model name).

    `name=None` builds the seeded random tiny Llama and byte tokenizer (no download). With a
    `device_map` the model is placed by transformers/accelerate and `device` is ignored. With
    `tp > 1` transformers shards it over the `tp` launched processes
    (`DistributedConfig(tp_size=tp)`) and places it itself (each rank's GPU, else the CPU).
    """
    if name is None:
        tokenizer = byte_tokenizer()
        torch_dtype = torch.float32 if dtype == "auto" else DTYPES[dtype]
        model = tiny_llama(len(tokenizer), seed=seed, dtype=torch_dtype)
        if tp > 1:  # transformers shards only in from_pretrained: every rank saves its (identical) copy and loads it
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                return _from_pretrained(folder, dtype, None, tp).eval(), tokenizer, DEFAULT_MODEL_NAME
        model = _dispatch(model, device_map) if device_map is not None else model.to(device)
        return model, tokenizer, DEFAULT_MODEL_NAME
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise EvalError(f"could not load model {name!r}: {_first_line(error)}") from error
    model = _from_pretrained(name, dtype, device_map, tp)
    if device_map is None and tp == 1:
        model = model.to(device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise EvalError(f"the tokenizer of {name!r} has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, name


def _from_pretrained(name: str, dtype: str, device_map: str | dict | None, tp: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[dtype], "device_map": device_map}
    if tp > 1:
        from transformers.distributed import DistributedConfig

        kwargs = {"dtype": DTYPES[dtype], "distributed_config": DistributedConfig(tp_size=tp)}
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise EvalError(f"could not load model {name!r}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _dispatch(model: torch.nn.Module, device_map: str | dict) -> torch.nn.Module:
    """Place an in-memory model with accelerate, as from_pretrained(device_map=...) would."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the input ids go: the device of the input embeddings (the first layer under a device map)."""
    return model.get_input_embeddings().weight.device


def context_length(model: torch.nn.Module) -> int | None:
    """Positions the model supports (`max_position_embeddings`), or None when the config has no limit."""
    text_config = model.config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None)


def pool_placement(model: torch.nn.Module) -> list[dict[str, str]]:
    """Per layer of a wrapped model: the device of its attention weights and of its page pool."""
    runtime = model.hf_paged_runtime
    placement = []
    for module in sorted(runtime.attention_modules, key=lambda module: module.layer_idx):
        layer_idx = module.layer_idx
        weight_device = next(module.parameters()).device
        placement.append({"layer": layer_idx, "weights": str(weight_device), "pool": str(runtime.pool.pools[layer_idx].device)})
    return placement
