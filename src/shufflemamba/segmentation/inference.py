"""Test-time inference: whole-image, or sliding windows as mmsegmentation's ``slide`` mode.

Sliding windows of ``crop`` x ``crop`` every ``stride`` pixels; the last row / column of windows is
shifted back to end at the border, so every window lies inside the image (smaller images give one
window of their own size). Overlapping logits are averaged. The result is resized to the size the
prediction is scored at (the original image's), bilinearly, before the argmax.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one side."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


@torch.no_grad()
def slide_logits(model: nn.Module, image: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """(B, 3, H, W) -> averaged logits (B, C, H, W) over sliding windows."""
    b, _, h, w = image.shape
    out = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            y2, x2 = min(y + crop, h), min(x + crop, w)
            out[:, :, y:y2, x:x2] += model(image[:, :, y:y2, x:x2]).float()
            count[:, :, y:y2, x:x2] += 1
    return out / count


@torch.no_grad()
def predict_logits(model: nn.Module, image: Tensor, num_classes: int, *, mode: str, crop: int, stride: int,
                   out_size: Sequence[int] | None = None, amp: bool = False, amp_dtype: str = "bfloat16") -> Tensor:
    """Logits (B, C, *out_size) for a normalised image batch, in ``mode`` "slide" or "whole"."""
    autocast = (torch.autocast(image.device.type, dtype=getattr(torch, amp_dtype)) if amp
                else contextlib.nullcontext())
    with autocast:
        logits = slide_logits(model, image, num_classes, crop, stride) if mode == "slide" else model(image).float()
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits
