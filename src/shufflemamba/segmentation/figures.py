"""Pictures of a segmentation run: curves from ``metrics.jsonl``, and image / truth / prediction rows.

matplotlib with the Agg backend (no display); files are written atomically (temp file + rename).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..training.plots import finish_axes, pyplot, save_figure


def palette(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(256, 3) uint8 colours: distinct for the classes (a fixed seed), black for ignore."""
    rng = np.random.default_rng(3)
    colours = rng.integers(40, 256, size=(256, 3), dtype=np.int64).astype(np.uint8)
    colours[0] = (70, 70, 70) if num_classes > 1 else colours[0]
    if ignore_index < 256:
        colours[ignore_index] = 0
    return colours


def colour_mask(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8."""
    return palette(num_classes, ignore_index)[np.clip(mask, 0, 255).astype(np.int64)]


def plot_seg_curves(rows: list[dict[str, Any]], path: str) -> str | None:
    """Loss (train, val) and mIoU / mAcc / aAcc against the iteration."""
    if not rows:
        return None
    its = [r["iter"] for r in rows]
    fig, (ax_loss, ax_m) = pyplot().subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(its, [r["train_loss"] for r in rows], "o-", label="train (with aux. head)")
    ax_loss.plot(its, [r["val_loss"] for r in rows], "s-", label="val")
    finish_axes(ax_loss, "iteration", "loss")
    for key, style in (("mIoU", "o-"), ("mAcc", "s--"), ("aAcc", "^:")):
        ax_m.plot(its, [r[key] for r in rows], style, label=key)
    finish_axes(ax_m, "iteration", "%")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_predictions(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: str, *,
                     num_classes: int, ignore_index: int, classes: Sequence[str] | None = None) -> str:
    """One row per sample: image | true mask | predicted mask (same colours), with a class legend."""
    from matplotlib.patches import Patch

    n = len(samples)
    fig, axes = pyplot().subplots(n, 3, figsize=(9, 3 * n + 0.8), squeeze=False)
    for row, (image, truth, pred, name) in zip(axes, samples):
        for ax, pic, title in zip(row, (image, colour_mask(truth, num_classes, ignore_index),
                                        colour_mask(pred, num_classes, ignore_index)), (name, "truth", "prediction")):
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    if classes:
        colours = palette(num_classes, ignore_index)
        handles = [Patch(color=colours[i] / 255.0, label=c) for i, c in enumerate(classes[:num_classes])]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.8 / (3 * n + 0.8) + 0.02, 1, 1))
    else:
        fig.tight_layout()
    return save_figure(fig, path)
