"""The encoder-decoder table of scripts/support_matrix.py: transformers' seq2seq and speech-seq2seq
auto mappings, checked like the causal one.

Each model type of `MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES` (mapping "text") and of
`MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES` (mapping "speech") is built tiny from its config class's
defaults (sizes shrunk as for the causal table, encoder positions too) and generates 5 tokens in
greedy, beam search (4 beams, 2 returned) and sampling (2 returned) from two sources of unequal
length: right-padded token ids for text models; for speech models random features (or samples) of
the shape their main input takes, with an attention mask where the model takes one. The verdicts
are those of the causal table (pass, refused, not built, error, MISMATCH).
"""


import torch
import transformers
from transformers import AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
)

import hf_paged

MAPPINGS = {
    "text": (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, AutoModelForSeq2SeqLM),
    "speech": (MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, AutoModelForSpeechSeq2Seq),
}
HEADING = "## Encoder-decoder models"
# Encoder and decoder positions of a tiny model (Whisper's encoder takes 2 x max_source_positions frames).
POSITIONS = {"max_source_positions": 32, "max_target_positions": 64}
# A tiny config that shrinking leaves big (a vocabulary or width it does not reach) is not built: more
# parameters than this would take gigabytes on a machine the table shares.
MAX_PARAMETERS = 60_000_000
SOURCE_LENGTHS = (9, 5)  # the two sources; the second is padded to the first's length


def rows_of(mapping: str, types: list[str] | None = None) -> list[str]:
    names = MAPPINGS[mapping][0]
    return sorted(names) if types is None else [t for t in types if t in names]


def tiny_config(matrix, model_type: str) -> transformers.PretrainedConfig:
    """The causal table's shrinking, plus encoder/decoder positions and a decoder start token in the vocabulary."""
    config_class = type(transformers.AutoConfig.for_model(model_type))
    values = config_class().to_dict()
    kwargs = _shrink(matrix, values)
    start = values.get("decoder_start_token_id")
    if start is None or start >= matrix.VOCAB:  # T5 starts from its pad token; others from ids past the vocabulary
        kwargs["decoder_start_token_id"] = matrix.SIZES["pad_token_id"]
    return config_class(**kwargs)


def _shrink(matrix, values: dict) -> dict:
    """The causal table's shrinking, also of nested `encoder` / `decoder` dicts (T5Gemma), and positions."""
    kwargs = matrix.shrink(values)
    kwargs.update({key: size for key, size in POSITIONS.items() if values.get(key) is not None})
    for key in ("encoder", "decoder"):
        if isinstance(values.get(key), dict):
            kwargs[key] = {**values[key], **_shrink(matrix, values[key])}
    return kwargs


def sources(model, vocab: int) -> dict[str, torch.Tensor]:
    """The model's main input for two sources of unequal length (with the mask the model takes)."""
    config, name = model.config, model.main_input_name
    generator = torch.Generator().manual_seed(1)
    longest, short = SOURCE_LENGTHS
    if name == "input_ids":
        input_ids = torch.randint(3, vocab, (2, longest), generator=generator)
        mask = torch.ones_like(input_ids)
        # Right-padded, as seq2seq tokenizers pad sources; left-padded prompts for the decoder-only models
        # (audio LMs) these mappings also list.
        padding = slice(short, None) if getattr(config, "is_encoder_decoder", False) else slice(None, longest - short)
        input_ids[1, padding], mask[1, padding] = getattr(config, "pad_token_id", None) or 0, 0
        return {"input_ids": input_ids, "attention_mask": mask}
    if name == "input_features" and getattr(config, "num_mel_bins", None) and getattr(config, "max_source_positions", None):
        # Whisper-style: [batch, mel bins, frames], every input the same number of frames (padded audio)
        frames = 2 * config.max_source_positions
        return {name: torch.randn((2, config.num_mel_bins, frames), generator=generator)}
    if name == "input_features" and getattr(config, "input_feat_per_channel", None):
        # Speech2Text-style: [batch, frames, features] with a frame mask
        features = config.input_feat_per_channel * getattr(config, "input_channels", 1)
        return _ragged(name, torch.randn((2, 4 * longest, features), generator=generator))
    if name == "input_values":  # raw samples [batch, samples] with a sample mask
        return _ragged(name, torch.randn((2, 400 * longest), generator=generator))
    raise ValueError(f"no tiny input for main input {name!r} of {type(model).__name__}")


def _ragged(name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = torch.ones(values.shape[:2], dtype=torch.long)
    cut = values.shape[1] * SOURCE_LENGTHS[1] // SOURCE_LENGTHS[0]
    values[1, cut:], mask[1, cut:] = 0, 0
    return {name: values, "attention_mask": mask}


def generate_all(matrix, model) -> dict[str, torch.Tensor]:
    inputs = sources(model, matrix.VOCAB)
    out = {}
    for name, mode in matrix.MODES.items():
        torch.manual_seed(0)
        out[name] = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, use_cache=True, **mode)
    return out


def check(matrix, mapping: str, model_type: str) -> tuple[str, str]:
    """(result, reason) for one model type of one mapping."""
    auto = MAPPINGS[mapping][1]
    try:
        config = tiny_config(matrix, model_type)
        with torch.device("meta"):
            size = sum(p.numel() for p in auto.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters")
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
        expected = generate_all(matrix, model)
    except Exception as error:  # noqa: BLE001 - any failure to build is a row of the table
        return "not built", f"{type(error).__name__}: {matrix.one_line(error)}"
    try:
        hf_paged.wrap(model, num_pages=512, page_size=4)
    except hf_paged.UnsupportedModelError as error:
        return "refused", matrix.one_line(error).split(": ", 1)[-1]
    try:
        got = generate_all(matrix, model)
    except Exception as error:  # noqa: BLE001
        return "error", f"{type(error).__name__}: {matrix.one_line(error)}"
    different = [name for name in matrix.MODES if not torch.equal(got[name], expected[name])]
    if different:
        return "MISMATCH", "different tokens in " + ", ".join(different)
    via = "hf_paged.patches" if model.hf_paged_runtime.patch is not None else "attention interface"
    return "pass", f"same tokens (greedy, beam 4, sampling x2) via the {via}"


def check_with_timeout(matrix, mapping: str, model_type: str, seconds: int) -> tuple[str, str]:
    return matrix.run_with_timeout(lambda: check(matrix, mapping, model_type), seconds)


def table(matrix, rows: list[tuple[str, str, str, str]]) -> str:
    """The encoder-decoder section of docs/support.md: rows of (model type, mapping, result, reason)."""
    counts = {result: sum(row[2] == result for row in rows) for result in matrix.RESULTS}
    lines = [
        HEADING,
        "",
        f"Generated by `python scripts/support_matrix.py --tables seq2seq` with transformers {transformers.__version__}; "
        "do not edit by hand. Every model type of transformers' seq2seq (`text`) and speech-seq2seq (`speech`) auto "
        "mappings, as a tiny random model (the config class's defaults, sizes shrunk as above, 32 encoder positions), "
        "fp32 on CPU: greedy, beam search (4 beams, 2 returned) and sampling (2 returned) from two sources of unequal "
        "length (token ids, right-padded; left-padded for the decoder-only models these mappings list; for speech models, random features or samples of the shape their main input "
        "takes), unwrapped and wrapped. The results mean what they mean above; a type in both mappings has a row in each "
        f"(their classes differ). A shrunk config with more than {MAX_PARAMETERS // 10**6}M parameters is `not built`.",
        "",
        f"**{len(rows)} rows: " + ", ".join(f"{counts[r]} {r}" for r in matrix.RESULTS) + ".**",
        "",
        "| model type | mapping | result | reason |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {mapping} | {result} | {reason.replace('|', '/')} |" for t, mapping, result, reason in rows]
    return "\n".join(lines) + "\n"


def parse_table(matrix, text: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The rows of a generated encoder-decoder section: (model type, mapping) -> (result, reason)."""
    rows = {}
    for line in text.split(HEADING, 1)[-1].splitlines() if HEADING in text else []:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] in MAPPINGS and cells[2] in matrix.RESULTS:
            rows[(cells[0], cells[1])] = (cells[2], cells[3])
    return rows


def replace_section(document: str, section: str) -> str:
    """docs/support.md with its encoder-decoder section replaced (appended when it has none)."""
    causal = document.split(HEADING, 1)[0].rstrip("\n")
    return causal + "\n\n" + section
