"""The end-of-run report image: one curve per loss term, and the eval metrics over steps."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_TERMS = (("loss", "total"), ("loss_text", "L_text"), ("loss_auxiliary", "L_auxiliary (λ)"), ("loss_contrastive", "L_contrastive (α, InfoNCE)"))
# The eval metrics worth a curve (recall@5/10 and the like stay in the JSON logs).
KEY_METRICS = ("exact_match", "bleu", "wer", "cer", "text_to_media_recall@1", "media_to_text_recall@1")


def _moving_average(points: list[tuple[int, float]], window: int) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for i in range(len(points)):
        chunk = [v for _, v in points[max(0, i - window + 1) : i + 1]]
        steps.append(points[i][0])
        values.append(sum(chunk) / len(chunk))
    return steps, values


def write_report(
    log_history: list[dict],
    eval_history: list[dict],
    path: str | Path,
    title: str = "training report",
    boundaries: list[tuple[int, str]] = (),
) -> Path:
    """Plot each loss term (moving average; steps where a term was absent are skipped) and the key eval
    metrics against the optimizer step; `boundaries` marks stage changes. Saves a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(13, 5))
    window = max(1, len(log_history) // 40)
    for key, label in LOSS_TERMS:
        points = [(r["step"], r[key]) for r in log_history if r.get(key) is not None and not math.isnan(r[key]) and r[key] > 0]
        if points:
            losses.plot(*_moving_average(points, window), label=label)
    losses.set_xlabel("step")
    losses.set_ylabel(f"loss (moving average over {window} steps)")
    losses.set_yscale("log")
    losses.set_title("loss terms")
    losses.legend()
    names = sorted({k for record in eval_history for k in record if k.endswith(KEY_METRICS)})
    for name in names:
        scale = 100 if name.endswith("bleu") else 1
        points = [(r["step"], r[name] / scale) for r in eval_history if r.get(name) is not None]
        metrics.plot(*zip(*points), marker="o", label=name + (" / 100" if scale != 1 else ""))
    metrics.set_xlabel("step")
    metrics.set_ylim(-0.02, 1.02)
    metrics.set_title("evaluation (validation split)")
    if names:
        metrics.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for axis in (losses, metrics):
        for step, label in boundaries:
            axis.axvline(step, color="grey", linestyle=":", linewidth=1)
            axis.text(step, 1.0, f" {label}", transform=axis.get_xaxis_transform(), fontsize=8, va="top", color="grey")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
