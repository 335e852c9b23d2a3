"""Quality scores of generated text against references: ROUGE (rouge-score), BLEU and chrF (sacrebleu),
and exact match of the first line (for code completion)."""

from . import EvalError

METRICS = ("rouge", "bleu", "chrf", "first_line")
ALIASES = {"sacrebleu": ("bleu", "chrf")}


def parse_metrics(text: str) -> list[str]:
    """`--metric rouge` or a comma-separated list, e.g. "rouge,bleu,chrf" ("sacrebleu" = bleu,chrf)."""
    names = []
    for name in (part.strip().lower() for part in text.split(",") if part.strip()):
        names.extend(ALIASES.get(name, (name,)))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise EvalError(f"unknown --metric {text!r}; expected one or more of {', '.join(METRICS + tuple(ALIASES))} (comma-separated)")
    return list(dict.fromkeys(names))


def score(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """Corpus scores, each in [0, 100]: rouge1/rouge2/rougeL (mean F1), bleu, chrf, first_line_exact
    (percent of samples whose first non-blank line equals the reference's, surrounding spaces ignored)."""
    if not predictions:
        return {}
    scores: dict[str, float] = {}
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        results = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
        for key in ("rouge1", "rouge2", "rougeL"):
            scores[key] = 100.0 * sum(result[key].fmeasure for result in results) / len(results)
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            scores["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
        if "chrf" in metrics:
            scores["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    if "first_line" in metrics:
        same = [first_line(prediction) == first_line(reference) for prediction, reference in zip(predictions, references)]
        scores["first_line_exact"] = 100.0 * sum(same) / len(same)
    return scores


def first_line(text: str) -> str:
    """The first line of `text` that is not blank, without its surrounding spaces ("" if none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_available(metrics: list[str]) -> None:
    """Raise EvalError naming the package to install when a metric's library is missing."""
    needed = {"rouge": "rouge_score", "bleu": "sacrebleu", "chrf": "sacrebleu"}
    install = {"rouge_score": "rouge-score", "sacrebleu": "sacrebleu"}
    for metric in metrics:
        if metric not in needed:
            continue
        try:
            __import__(needed[metric])
        except ImportError as error:
            raise EvalError(f"--metric {metric} needs {install[needed[metric]]}: pip install 'hf_paged[eval]'") from error
