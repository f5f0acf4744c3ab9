"""mIoU, mAcc and aAcc from a confusion matrix, as mmsegmentation's IoUMetric computes them.

Ours rather than torchmetrics': the reference's numbers need its exact rules (a class absent from
both truth and prediction is left out of the mean as NaN; a class predicted but never true scores
IoU 0 and no accuracy), and a (C, C) int64 matrix that DDP ranks simply add is all it takes.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class; ignored pixels left out."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def seg_metrics(conf: torch.Tensor) -> dict[str, Any]:
    """``mIoU``, ``mAcc``, ``aAcc`` (percent) and per-class ``IoU`` / ``Acc`` lists (NaN: undefined).

    IoU_c = TP / (TP + FP + FN); Acc_c = TP / (TP + FN); aAcc = sum TP / all labelled pixels;
    the means skip NaN classes (0 / 0), as mmseg's nanmean.
    """
    conf = conf.double()
    tp = conf.diag()
    label_area = conf.sum(1)
    pred_area = conf.sum(0)
    union = label_area + pred_area - tp
    iou = tp / union  # 0 / 0 -> NaN
    acc = tp / label_area

    def nanmean(v: torch.Tensor) -> float:
        ok = ~torch.isnan(v)
        return float(v[ok].mean()) * 100 if ok.any() else math.nan

    total = float(label_area.sum())
    return {
        "mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": float(tp.sum()) / total * 100 if total else math.nan,
        "IoU": [float(x) * 100 for x in iou], "Acc": [float(x) * 100 for x in acc],
    }
