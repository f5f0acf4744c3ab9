"""Loss / accuracy curves from ``metrics.jsonl`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file; returns [] when absent. Malformed lines (a crash mid-write) are skipped."""
    rows: list[dict[str, Any]] = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)


def save_figure(fig: Any, path: str) -> str:
    """Write ``fig`` to ``path`` atomically (temp file + rename) and close it. Returns ``path``."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def plot_curves(rows: list[dict[str, Any]], path: str) -> str | None:
    """Two panels (loss; top-1 accuracy) written atomically to ``path``. Returns the path, or None
    when there is nothing to plot."""
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "s-", label="val")
    finish_axes(ax_loss, "epoch", "loss")
    ax_acc.plot(epochs, [r["val_top1"] for r in rows], "o-", label="val top-1")
    if any("ema_top1" in r for r in rows):
        ax_acc.plot([r["epoch"] for r in rows if "ema_top1" in r], [r["ema_top1"] for r in rows if "ema_top1" in r], "s--", label="EMA top-1")
    finish_axes(ax_acc, "epoch", "accuracy (%)")
    fig.tight_layout()
    return save_figure(fig, path)
