"""The evaluation report: summary.json, samples.jsonl and a table on screen."""

import json
import os
from pathlib import Path

from .metrics import score
from .runner import RunStats


def summarize(records: list[dict], stats: list[RunStats], metrics: list[str]) -> dict:
    """Summary of one mode (paged or stock) over all processes.

    Processes run side by side, so throughput is all generated tokens over the slowest process's
    generate() time; time to first token is the mean over batches; KV peaks are the largest of any
    process (each process has its own device and pool).
    """
    first_token = [seconds for process in stats for seconds in process.first_token_seconds]
    wall = max((process.seconds for process in stats), default=0.0)
    tokens = sum(process.generated_tokens for process in stats)
    with_references = [record for record in records if record["reference"] is not None]
    return {
        "num_samples": len(records),
        "num_batches": len(first_token),
        "generated_tokens": tokens,
        "generate_seconds": wall,
        "tokens_per_second": tokens / wall if wall > 0 else 0.0,
        "time_to_first_token_s": sum(first_token) / len(first_token) if first_token else 0.0,
        "peak_kv_bytes": max((process.peak_kv_bytes for process in stats), default=0),
        "peak_shared_pages": max((process.peak_shared_pages for process in stats), default=0),
        "peak_pages_in_use": max((process.peak_pages_in_use for process in stats), default=0),
        "batches": sorted((entry for process in stats for entry in process.batches), key=lambda entry: entry["batch"]),
        "scores": score(
            [record["output_text"] for record in with_references],
            [record["reference"] for record in with_references],
            metrics,
        ),
    }


def agreement(paged: list[dict], stock: list[dict]) -> float:
    """Fraction of samples whose generated token ids (every returned sequence) are identical."""
    stock_by_index = {record["index"]: record for record in stock}
    same = sum(record["output_ids"] == stock_by_index[record["index"]]["output_ids"] for record in paged)
    return same / len(paged) if paged else 0.0


def ratios(paged: dict, stock: dict) -> dict[str, float | None]:
    """paged / stock for speed, latency and KV memory (None where stock measured 0)."""
    keys = ("tokens_per_second", "time_to_first_token_s", "peak_kv_bytes")
    return {key: (paged[key] / stock[key] if stock[key] else None) for key in keys}


def write_outputs(output_dir: str, records: list[dict], summary: dict) -> tuple[Path, Path]:
    """Write `samples.jsonl` (one object per sample, dataset order) and `summary.json`."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    samples_path = directory / "samples.jsonl"
    with open(samples_path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary_path = directory / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return samples_path, summary_path


# What the scores of metrics.score are, for the table (summary.json keeps the bare names).
SCORE_UNITS = {"rouge1": "F1, 0-100", "rouge2": "F1, 0-100", "rougeL": "F1, 0-100", "bleu": "0-100", "chrf": "0-100",
               "first_line_exact": "% of samples"}


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(summary: dict) -> str:
    """A one-screen table: one row per measure; columns paged, stock and paged/stock with --compare."""
    paged, stock, ratio = summary, summary.get("stock"), summary.get("ratios", {})
    rows = [("samples", "num_samples"), ("generated tokens", "generated_tokens"), ("tokens/s", "tokens_per_second"),
            ("time to first token (s)", "time_to_first_token_s"), ("peak KV bytes", "peak_kv_bytes"),
            ("peak shared pages", "peak_shared_pages")]
    rows += [(f"{name} ({SCORE_UNITS.get(name, '0-100')})", ("scores", name)) for name in paged["scores"]]
    header = ["", "paged"] + (["stock", "paged/stock"] if stock is not None else [])
    lines = [header]
    for title, key in rows:
        get = (lambda part: part["scores"].get(key[1])) if isinstance(key, tuple) else (lambda part: part[key])
        line = [title, _format(get(paged))]
        if stock is not None:
            line += [_format(get(stock)), _format(ratio.get(key) if isinstance(key, str) else None)]
        lines.append(line)
    if stock is not None:
        lines.append(["token agreement", _format(summary["agreement"]), "", ""])
        other = summary.get("stock_attention_agreement")
        if other is not None:  # half precision: stock against itself with its other attention implementation
            lines.append([f"stock {' vs '.join(other['implementations'])} agreement", "", _format(other["agreement"]), ""])
        error = summary.get("logit_error_vs_fp32")
        if error is not None:  # half precision: mean |logit - fp32 logit| along the fp32 model's greedy path
            lines.append(["logit error vs fp32 (mean abs)", _format(error["paged"]), _format(error["stock"]),
                          _format(error["ratio"])])
            if "top1_paged" in error:  # per step: one near-tie flips one step here, not a whole sample
                lines.append(["top-1 = fp32 (per step)", _format(error["top1_paged"]), _format(error["top1_stock"]), ""])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in enumerate(zip(line, widths))) for line in lines]
    return os.linesep.join(text)
