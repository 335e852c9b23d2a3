"""Evaluation samples through `datasets`: a hub dataset, local files, or the built-in task."""

import os
import string
from dataclasses import dataclass
from pathlib import Path

from . import DATA_DIR, EvalError

# The built-in task (scripts/make_default_data.py): complete held-out stdlib functions from their
# signature and docstring; the prompt is the source as written, the reference the next lines.
BUNDLED_DATA = DATA_DIR / "stdlib_functions.jsonl"
# Built-in data of encoder-decoder models (`--task`): 16 English sentences with German translations,
# 8 short news paragraphs with one-sentence summaries (written for hf_paged; a smoke test, not a benchmark).
TASK_DATA = {"code": BUNDLED_DATA, "translation": DATA_DIR / "translation_en_de.jsonl",
             "summarization": DATA_DIR / "summarization_news.jsonl"}
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_TEMPLATE = "{text}\nSummary:"


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """What --text-column, --reference-column, --prompt-template and --metric mean when not given."""

    text_column: str
    reference_column: str
    prompt_template: str
    metric: str


BUILTIN_TASK = TaskDefaults("prompt", "reference", "{text}", "rouge,bleu,first_line")
USER_DATA = TaskDefaults("document", "summary", DEFAULT_TEMPLATE, "rouge")
# --task: the columns and metrics of each task's data (built-in or the user's), and a causal model's
# prompt. An encoder-decoder model's prompt is the text itself ("{text}"): the source it encodes.
TASKS = {
    "code": BUILTIN_TASK,
    "translation": TaskDefaults("source", "target", "English: {text}\nGerman:", "sacrebleu"),
    "summarization": USER_DATA,
}
ENCODER_DECODER_TEMPLATE = "{text}"


def apply_task_defaults(args, encoder_decoder: bool = False) -> None:
    """Fill eval.py's data and metric flags left unset (None).

    `--task` names the defaults; without it: the built-in code task when neither --dataset nor
    --data-files is given (the built-in translation task for an encoder-decoder model), else those
    of a summarization-style dataset. An encoder-decoder model's prompt template is "{text}".
    """
    if getattr(args, "task", None) is None and args.dataset is None and not args.data_files:
        args.task = "translation" if encoder_decoder else "code"
    defaults = TASKS[args.task] if getattr(args, "task", None) else USER_DATA
    if encoder_decoder and args.prompt_template is None:
        args.prompt_template = ENCODER_DECODER_TEMPLATE
    for flag in ("text_column", "reference_column", "prompt_template", "metric"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(defaults, flag))


@dataclass(slots=True)
class Sample:
    """One prompt to generate from. `index` is the row's position in the selection (output order)."""

    index: int
    id: str
    prompt: str
    reference: str | None


def file_format(paths: list[str]) -> str:
    """The `datasets` builder for local files ("json", "csv" or "parquet"), from their extensions."""
    kinds = set()
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix not in FORMATS:
            raise EvalError(f"cannot read {path!r}: expected a file ending in one of {sorted(FORMATS)}")
        if not Path(path).exists():
            raise EvalError(f"data file {path!r} does not exist")
        kinds.add(FORMATS[suffix])
    if len(kinds) != 1:
        raise EvalError(f"--data-files mixes formats {sorted(kinds)}; pass files of one format")
    return kinds.pop()


def load_rows(
    dataset: str | None, config: str | None, split: str | None, data_files: list[str] | None, files_split: str = "train"
):
    """A `datasets.Dataset`: local files (one split named `files_split`, the default split), else a
    hub dataset (split "test" unless given). The built-in data is one split named "test"."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if data_files:
            files = {files_split: data_files}
            return datasets.load_dataset(file_format(data_files), data_files=files, split=split or files_split)
        return datasets.load_dataset(dataset, config, split=split or "test")
    except EvalError:
        raise
    except Exception as error:  # datasets raises many types (offline, missing config, bad split, parse errors)
        what = ", ".join(data_files) if data_files else f"{dataset!r}" + (f" ({config})" if config else "")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "corresponds to no data" in first_line:  # datasets' own check of a slice like "train[:0]"
            raise EvalError(f"the selection is empty: split {split!r} has no rows; check --split and --limit") from error
        hint = "; check the name and config, or that it is cached when offline, or pass --data-files" if not data_files else ""
        raise EvalError(f"could not load {what} split {split or (files_split if data_files else 'test')!r}: {first_line}{hint}") from error


def template_fields(template: str) -> list[str]:
    """Names between braces in a prompt template, e.g. ["text"] for "{text}\\nSummary:"."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise EvalError(f"bad --prompt-template {template!r}: {error}") from error


def make_samples(rows, text_column: str, reference_column: str | None, template: str, limit: int | None) -> list[Sample]:
    """Check the columns, apply --limit and the template; returns one Sample per row, in order.

    The template may name `{text}` (the text column) and any column of the dataset.
    """
    columns = list(rows.column_names)
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be >= 1, got {limit}")
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise EvalError("the selection is empty (0 rows); check --split and --limit")
    wanted = {"--text-column": text_column}
    if reference_column is not None:
        wanted["--reference-column"] = reference_column
    for name in template_fields(template):
        if name != "text":
            wanted[f"--prompt-template field {{{name}}}"] = name
    for flag, column in wanted.items():
        if column not in columns:
            raise EvalError(f"{flag} {column!r} is not a column; the dataset has columns {columns}")
    samples = []
    for index, row in enumerate(rows):
        values = {name: "" if value is None else str(value) for name, value in row.items()}
        prompt = template.format_map({**values, "text": values[text_column]})
        reference = values[reference_column] if reference_column is not None else None
        sample_id = values["id"] if "id" in values and values["id"] else str(index)
        samples.append(Sample(index=index, id=sample_id, prompt=prompt, reference=reference))
    return samples


def bundled_data_files(task: str = "code") -> list[str]:
    """A built-in task's file: code (40 held-out stdlib functions to complete), translation or summarization."""
    path = TASK_DATA[task]
    if not path.exists():
        raise EvalError(f"the bundled dataset {os.fspath(path)} is missing; reinstall hf_paged")
    return [os.fspath(path)]
