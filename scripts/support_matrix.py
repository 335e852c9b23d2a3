"""Which causal-LM families of the installed transformers hf_paged serves, checked, not claimed.

For every model type of transformers' causal-LM auto mapping: build a tiny random model from the
config class's defaults with the sizes shrunk (`tiny_config`), run greedy, beam search (4 beams)
and sampling (2 return sequences) on left-padded prompts of unequal length, unwrapped and wrapped
(fp32, CPU), and record one result per type:

  pass       wrapped tokens equal stock tokens in all three modes
  refused    wrap() raised UnsupportedModelError (the reason is its message)
  not built  the tiny config, the model or stock generate() failed (the reason is the error)
  error      wrap() accepted the model but generate() raised
  MISMATCH   wrapped tokens differ from stock: a bug (wrap() must refuse what it cannot serve)

The encoder-decoder models of the seq2seq and speech-seq2seq auto mappings get a second table,
checked the same way from two right-padded sources (scripts/_support_seq2seq.py).

    python scripts/support_matrix.py                      # every type -> docs/support.md
    python scripts/support_matrix.py --types llama bloom  # some types, printed only
    python scripts/support_matrix.py --tables seq2seq     # only the encoder-decoder table, rewritten
"""

import argparse
import contextlib
import io
import signal
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_paged

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _support_seq2seq as seq2seq  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "support.md"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"
VOCAB = 128
# Sizes of a tiny model, applied to whichever of these a config class has (nested configs too).
SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads"), 4),
    **dict.fromkeys(("encoder_attention_heads", "decoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads"), 2),
    "head_dim": 16,
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "decoder_ffn_dim", "encoder_ffn_dim"), 128),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"), 2),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), 32),
    "num_experts_per_tok": 2,
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len"), 128),
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # Windowed families: a window the prompts (9 tokens, 5 new) cross, so that sliding-window groups
    # release pages during every mode (set only where the default is an int window).
    "sliding_window": 4,
}
MODES = {
    "greedy": dict(),
    "beam 4": dict(num_beams=4, num_return_sequences=2),
    "sampling x2": dict(do_sample=True, num_return_sequences=2),
}
RESULTS = ("pass", "refused", "not built", "error", "MISMATCH")


def shrink(values: dict) -> dict:
    """Config kwargs: the defaults' keys in SIZES set small; nested `*_config` dicts shrunk too."""
    kwargs = {key: SIZES[key] for key, value in values.items() if key in SIZES and value is not None}
    if not isinstance(values.get("sliding_window"), int) or isinstance(values.get("sliding_window"), bool):
        kwargs.pop("sliding_window", None)
    for key, value in values.items():
        if key.endswith("_config") and isinstance(value, dict):
            kwargs[key] = {**value, **shrink(value)}
    layers = next((kwargs[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in kwargs), None)
    if isinstance(values.get("layer_types"), list) and layers:
        kwargs["layer_types"] = values["layer_types"][:layers]
    if "attention_types" in values and layers:  # GPT-Neo: one (global, local) pair per two layers
        kwargs["attention_types"] = [[["global", "local"], layers // 2]]
    return kwargs


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    config_class = type(AutoConfig.for_model(model_type))
    return config_class(**shrink(config_class().to_dict()))


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of 9 and 5 tokens."""
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    input_ids[1, :4], mask[1, :4] = 0, 0
    return input_ids, mask


def generate_all(model) -> dict[str, torch.Tensor]:
    input_ids, mask = prompts()
    out = {}
    for name, mode in MODES.items():
        torch.manual_seed(0)
        out[name] = model.generate(
            input_ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, pad_token_id=0, use_cache=True, **mode
        )
    return out


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return (text[:157] + "...") if len(text) > 160 else text


def check(model_type: str) -> tuple[str, str]:
    """(result, reason) for one model type."""
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
        expected = generate_all(model)
    except Exception as error:  # noqa: BLE001 - any failure to build is a row of the table
        return "not built", f"{type(error).__name__}: {one_line(error)}"
    try:
        hf_paged.wrap(model, num_pages=512, page_size=4)
    except hf_paged.UnsupportedModelError as error:
        return "refused", one_line(error).split(": ", 1)[-1]
    try:
        got = generate_all(model)
    except Exception as error:  # noqa: BLE001
        return "error", f"{type(error).__name__}: {one_line(error)}"
    different = [name for name in MODES if not torch.equal(got[name], expected[name])]
    if different:
        return "MISMATCH", "different tokens in " + ", ".join(different)
    via = "hf_paged.patches" if model.hf_paged_runtime.patch is not None else "attention interface"
    return "pass", f"same tokens (greedy, beam 4, sampling x2) via the {via}"


def shared() -> SimpleNamespace:
    """What the encoder-decoder table (scripts/_support_seq2seq.py) shares with the causal one."""
    return SimpleNamespace(**{name: globals()[name] for name in ("shrink", "one_line", "run_with_timeout", "VOCAB", "SIZES", "MODES", "RESULTS")})


def check_with_timeout(model_type: str, seconds: int) -> tuple[str, str]:
    return run_with_timeout(lambda: check(model_type), seconds)


def run_with_timeout(check_row, seconds: int) -> tuple[str, str]:
    """`check_row()`'s (result, reason), quietly; a row past `seconds` is "not built"."""
    def expire(*_):
        raise TimeoutError(f"took over {seconds} s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return check_row()
    except TimeoutError as error:
        return "not built", str(error)
    finally:
        signal.alarm(0)


def table(rows: list[tuple[str, str, str]]) -> str:
    counts = {result: sum(row[1] == result for row in rows) for result in RESULTS}
    lines = [
        "# Support matrix",
        "",
        f"Generated by `python scripts/support_matrix.py` with transformers {transformers.__version__} and torch "
        f"{torch.__version__.split('+')[0]}; do not edit by hand. Every model type of transformers' causal-LM auto "
        "mapping, as a tiny random model (the config class's defaults, sizes shrunk, sliding windows of 4 tokens), fp32 on CPU: greedy, beam "
        "search (4 beams) and sampling (2 return sequences) on two left-padded prompts of unequal length, "
        "unwrapped and wrapped. `pass`: the same tokens; `refused`: `wrap()` raised `UnsupportedModelError`; "
        "`not built`: the tiny model could not be built or run unwrapped (not a verdict on the family); `error`: "
        "wrapped generate() raised; `MISMATCH`: different tokens.",
        "",
        f"**{len(rows)} model types: " + ", ".join(f"{counts[r]} {r}" for r in RESULTS) + ".**",
        "",
        "| model type | result | reason |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {result} | {reason.replace('|', '/')} |" for t, result, reason in rows]
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> dict[str, tuple[str, str]]:
    """The rows of a generated table: model type -> (result, reason)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] in RESULTS:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def generated_with(text: str) -> str | None:
    marker = "with transformers "
    return text.split(marker, 1)[1].split()[0] if marker in text else None


def readme_block(text: str) -> str:
    """The README's supported list, rendered from a generated table (README carries it between markers)."""
    rows = parse_table(text)
    served = [t for t, (result, _) in rows.items() if result == "pass"]
    patched = [t for t in served if "hf_paged.patches" in rows[t][1]]
    counts = {result: sum(r == result for r, _ in rows.values()) for result in RESULTS}
    return "\n".join([
        README_BEGIN,
        *textwrap.wrap(f"- **Families** (generated from [docs/support.md](docs/support.md), transformers {generated_with(text)}): "
        f"{counts['pass']} of the {len(rows)} causal-LM model types give the unwrapped model's tokens, "
        f"{counts['refused']} are refused with a reason, {counts['not built']} could not be built as tiny "
        f"models, {counts['error']} raise and {counts['MISMATCH']} give different tokens. Served: "
        + ", ".join(f"`{t}`" for t in served) + ". Through `hf_paged.patches` (attention that bypasses the "
        "interface): " + ", ".join(f"`{t}`" for t in patched) + ".", width=100, subsequent_indent="  ",
                       break_on_hyphens=False),
        README_END,
    ])


def update_readme(text: str) -> None:
    readme = README.read_text()
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    README.write_text(readme[:start] + readme_block(text) + readme[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", help="only these model types; print the rows, write nothing")
    parser.add_argument("--tables", choices=("all", "causal", "seq2seq"), default="all",
                        help="which tables to check (and rewrite, without --types); default: all")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model type")
    parser.add_argument("--readme-only", action="store_true", help="only re-render README's list from docs/support.md")
    args = parser.parse_args(argv)
    if args.readme_only:
        update_readme(OUTPUT.read_text())
        return 0
    causal, encoder_decoder = args.tables in ("all", "causal"), args.tables in ("all", "seq2seq")
    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) if causal else set()
    known |= {t for mapping in seq2seq.MAPPINGS for t in seq2seq.rows_of(mapping)} if encoder_decoder else set()
    unknown = sorted(set(args.types or ()) - known)
    if unknown:
        print(f"not model types of the {args.tables} table(s) of transformers {transformers.__version__}: {unknown}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    rows, seq2seq_rows = [], []
    for model_type in (sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) if args.types is None else args.types) if causal else []:
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            continue
        result, reason = check_with_timeout(model_type, args.timeout)
        rows.append((model_type, result, reason))
        print(f"{model_type}: {result}: {reason}", flush=True)
    for mapping in seq2seq.MAPPINGS if encoder_decoder else ():
        for model_type in seq2seq.rows_of(mapping, args.types):
            result, reason = seq2seq.check_with_timeout(shared(), mapping, model_type, args.timeout)
            seq2seq_rows.append((model_type, mapping, result, reason))
            print(f"{model_type} ({mapping}): {result}: {reason}", flush=True)
    if not args.types:
        document = table(rows) if causal else OUTPUT.read_text()
        if encoder_decoder:
            document = seq2seq.replace_section(document, seq2seq.table(shared(), seq2seq_rows))
        elif seq2seq.HEADING in OUTPUT.read_text():  # keep the encoder-decoder table that is there
            document = seq2seq.replace_section(document, seq2seq.HEADING + OUTPUT.read_text().split(seq2seq.HEADING, 1)[1])
        OUTPUT.write_text(document)
        update_readme(OUTPUT.read_text())
        print(f"wrote {OUTPUT} and README.md's supported list")
    return 1 if any(row[-2] == "MISMATCH" for row in rows + seq2seq_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
