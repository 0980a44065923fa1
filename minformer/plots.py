"""Figures the CLI draws, written as PNG files with matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file, skipping a last line cut short by a kill."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(metrics_path: Path, out_path: Path) -> Path:
    """Draw training loss per step and the validation estimates against step."""
    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4.2))
    steps = [record["step"] for record in records if "loss" in record]
    losses = [record["loss"] for record in records if "loss" in record]
    axes.plot(steps, losses, linewidth=0.8, label="training loss")
    val = [(record["step"], record["val_loss_estimate"]) for record in records if "val_loss_estimate" in record]
    if val:
        axes.plot([step for step, _ in val], [loss for _, loss in val], "o-", label="validation loss (estimate)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return Path(out_path)
