"""Checks of scripts/eval.py's flags that argparse cannot make: each raises EvalError naming the flag."""

import argparse
import os
import re
from typing import TYPE_CHECKING

import torch

from . import EvalError

if TYPE_CHECKING:
    from accelerate import PartialState

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str | None) -> int | float | None:
    """`--max-memory`: "0.5" (fraction of free memory), "2GiB", "500MB" or a byte count."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in UNITS:
        raise EvalError(f"--max-memory {text!r}: expected bytes like 2GiB or 500MB, or a fraction like 0.5")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and "." in match.group(1):
        return number
    return int(number * UNITS[unit])


def check_args(args: argparse.Namespace, state: "PartialState") -> None:
    """Validate what argparse cannot: raise EvalError naming the flag."""
    for flag in ("max_new_tokens", "num_beams", "num_return_sequences", "batch_size"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.do_sample and args.num_return_sequences > args.num_beams:
        raise EvalError("--num-return-sequences must be <= --num-beams without --do-sample")
    if args.dataset and args.data_files:
        raise EvalError("pass either --dataset (hub) or --data-files (local), not both")
    if args.tp < 1:
        raise EvalError(f"--tp must be >= 1, got {args.tp}")
    if args.tp > 1:
        if state.num_processes != args.tp:
            raise EvalError(
                f"--tp {args.tp} shards the model over {args.tp} processes, but {state.num_processes} were launched: "
                f"use torchrun --nproc_per_node {args.tp} (or accelerate launch --num_processes {args.tp})"
            )
        if args.device_map is not None or args.device is not None:
            raise EvalError("--tp places the model itself (each rank's GPU, else the CPU): drop --device-map and --device")
    elif args.device_map is not None and state.num_processes > 1:
        raise EvalError("--device-map spreads one model over devices; run it in one process, not with --num_processes > 1")
    if args.threads is not None and args.threads < 0:
        raise EvalError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if not 0 <= args.seed < 2**31:
        raise EvalError(f"--seed must be in [0, 2**31), got {args.seed}")
    if args.do_sample and not args.temperature > 0:
        raise EvalError(f"--temperature must be > 0 with --do-sample, got {args.temperature}")
    if args.do_sample and not 0 < args.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1] with --do-sample, got {args.top_p}")
    if args.device is not None:
        check_device(args.device)
    if args.model is not None:
        check_model_path(args.model)


def check_device(text: str) -> None:
    """`--device`: a device torch knows that this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise EvalError(f"--device {text!r} is not a device: expected e.g. cpu, cuda, cuda:1") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    else:
        is_available = getattr(getattr(torch, device.type, None), "is_available", None)  # torch.xpu, torch.mps, ...
        if callable(is_available) and not is_available():
            raise EvalError(f"--device {text}: {device.type} is not available on this machine")


def check_model_path(name: str) -> None:
    """`--model` written as a path (./x, ../x, /x, ~/x, a/b/c) must be an existing folder; a hub name is org/name."""
    path = os.path.expanduser(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local and not os.path.isdir(path):
        what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
        raise EvalError(f"--model {name}: the folder {os.path.abspath(path)} {what}")
