"""Load and place the model of an evaluation: a hub/local checkpoint, or the built-in default model."""

import json

import torch

from . import EvalError, default_model_path

DEFAULT_MODEL_NAME = "builtin:stdlib-code-llama"

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


def is_encoder_decoder(name: str | None) -> bool:
    """Whether the model at `name` (None: the default model) is an encoder-decoder one (T5, BART, Marian, ...),
    from its config alone; False when the config cannot be read (load_model reports that next)."""
    if name is None:
        return False
    from transformers import AutoConfig

    try:
        return bool(getattr(AutoConfig.from_pretrained(name), "is_encoder_decoder", False))
    except (OSError, ValueError):
        return False


def load_model(name: str | None, dtype: str, device: torch.device, device_map: str | dict | None, tp: int = 1):
    """(model in eval mode, tokenizer with a pad token, model name).

    A decoder-only model loads through AutoModelForCausalLM and its tokenizer pads on the left; an
    encoder-decoder model (`config.is_encoder_decoder`) through AutoModelForSeq2SeqLM, its sources
    padded on the right, as seq2seq tokenizers pad them.

    `name=None` loads the trained default model shipped in hf_paged/data/default_model (no
    download; `dtype="auto"` loads it in fp32, where hf_paged's tokens equal stock's). With a
    `device_map` the model is placed by transformers/accelerate and `device` is ignored. With
    `tp > 1` transformers shards it over the `tp` launched processes
    (`DistributedConfig(tp_size=tp)`) and places it itself (each rank's GPU, else the CPU).
    """
    from transformers import AutoTokenizer

    path, model_name = (name, name) if name is not None else (str(default_model_path()), DEFAULT_MODEL_NAME)
    if name is None and dtype == "auto":
        dtype = "float32"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise EvalError(f"could not load model {model_name!r}: {_first_line(error)}") from error
    if tp > 1:
        check_tp_heads(path, model_name, tp)
    model = _from_pretrained(path, dtype, device_map, tp, progress=name is not None)
    if device_map is None and tp == 1:
        model = model.to(device)
    tokenizer.padding_side = "right" if model.config.is_encoder_decoder else "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise EvalError(f"the tokenizer of {model_name!r} has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, model_name


def check_tp_heads(path: str, model_name: str, tp: int) -> None:
    """Raise EvalError, before the model loads, when its KV heads do not divide by `--tp`: each rank
    must hold whole KV heads. The message names the --tp values that work and data parallelism."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path).get_text_config()
    except (OSError, ValueError):
        return  # from_pretrained reports an unloadable model next
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads % tp == 0:
        return
    sizes = [size for size in range(2, heads + 1) if heads % size == 0]
    other_tp = f"--tp {' or '.join(map(str, sizes))} (with as many processes), or " if sizes else ""
    raise EvalError(
        f"--tp {tp}: {model_name} has {heads} KV head{'s' if heads != 1 else ''} per layer, which "
        f"{'do' if heads != 1 else 'does'} not divide by {tp} (each rank must hold whole KV heads); use {other_tp}"
        f"data parallelism for {tp} processes: accelerate launch --num_processes {tp} scripts/eval.py ... without --tp"
    )


def _from_pretrained(name: str, dtype: str, device_map: str | dict | None, tp: int, progress: bool = True) -> torch.nn.Module:
    """The model through AutoModelForCausalLM (AutoModelForSeq2SeqLM for an encoder-decoder one);
    `progress=False` hides transformers' loading bar (the built-in model loads in a blink, and a
    bad-input run then prints its one error line only)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging

    kwargs = {"dtype": DTYPES[dtype], "device_map": device_map}
    if tp > 1:
        from transformers.distributed import DistributedConfig

        kwargs = {"dtype": DTYPES[dtype], "distributed_config": DistributedConfig(tp_size=tp)}
    shown = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        auto = AutoModelForSeq2SeqLM if is_encoder_decoder(name) else AutoModelForCausalLM
        return auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise EvalError(f"could not load model {name!r}: {_first_line(error)}") from error
    finally:
        if shown:
            logging.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
