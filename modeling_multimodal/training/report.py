"""The end-of-run report image: one curve per loss term, and the eval metrics over steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_TERMS = (("loss", "total"), ("loss_text", "L_text"), ("loss_other", "L_other (CTC)"), ("loss_cross", "L_cross (InfoNCE)"))


def write_report(log_history: list[dict], eval_history: list[dict], path: str | Path, title: str = "training report") -> Path:
    """Plot the loss terms (left) and each eval metric (right) against the optimizer step; save a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [record["step"] for record in log_history]
    for key, label in LOSS_TERMS:
        values = [record.get(key) for record in log_history]
        if any(v for v in values):
            losses.plot(steps, values, label=label)
    losses.set_xlabel("step")
    losses.set_ylabel("loss")
    losses.set_yscale("log")
    losses.set_title("loss terms")
    losses.legend()
    names = sorted({k for record in eval_history for k in record if k != "step"})
    for name in names:
        points = [(r["step"], r[name] / (100 if "bleu" in name else 1)) for r in eval_history if name in r]
        metrics.plot(*zip(*points), marker="o", label=name + (" /100" if "bleu" in name else ""))
    metrics.set_xlabel("step")
    metrics.set_title("evaluation")
    if names:
        metrics.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
