"""Evaluation metrics: plain functions for the trainer, and the same metrics as offline `evaluate` modules.

`evaluate.load("wer")` fetches its script from the Hub, which fails offline. Our metrics ship inside the
package (`metrics/<name>/<name>.py`) and `load_metric(name)` hands `evaluate.load` that local folder, so
no network is touched. Every module delegates to `functional.py`, the single implementation.

    >>> from modeling_multimodal.evaluation import load_metric, word_error_rate
    >>> load_metric("wer").compute(predictions=["the cat sit"], references=["the cat sat"])
    {'wer': 0.3333333333333333}
    >>> word_error_rate(["the cat sit"], ["the cat sat"])
    0.3333333333333333
"""

from __future__ import annotations

from pathlib import Path

from .functional import (
    DEFAULT_RECALL_KS,
    bleu,
    character_error_rate,
    exact_match,
    normalize_text,
    retrieval_recall,
    retrieval_recall_from_embeddings,
    word_error_rate,
)

METRICS_DIR = Path(__file__).parent / "metrics"
METRIC_NAMES = ("wer", "cer", "bleu", "exact_match", "retrieval_recall")


def metric_path(name: str) -> Path:
    """Local folder of the `evaluate` module `name` (one of `METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(METRIC_NAMES)}.")
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"Metric script {path / (name + '.py')} is missing: the package was installed without its "
            "metric scripts (setup.py package_data must include 'metrics/*/*.py')."
        )
    return path


def load_metric(name: str, **kwargs):
    """`evaluate.load` on the packaged module `name`; works offline. `kwargs` go to `evaluate.load`."""
    import evaluate  # imported here: the plain functions above must not need it

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = [
    "DEFAULT_RECALL_KS",
    "METRIC_NAMES",
    "bleu",
    "character_error_rate",
    "exact_match",
    "load_metric",
    "metric_path",
    "normalize_text",
    "retrieval_recall",
    "retrieval_recall_from_embeddings",
    "word_error_rate",
]
