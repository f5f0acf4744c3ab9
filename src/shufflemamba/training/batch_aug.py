"""Batched augmentation of an in-memory uint8 image array (the embedded Fashion-MNIST).

timm's pipeline transforms one PIL image at a time: for 28x28 images its Python overhead per sample
(PIL image, crop parameters, resize, flip, to-tensor, normalise, collate) is a visible share of a
small model's epoch on 2 cores (``benchmarks/bench_loader.py`` measures both paths).
:class:`BatchAugment` does the same operations on a whole batch of tensors:

* training: RandomResizedCrop (torchvision's parameter draw: up to 10 tries of area ``scale`` and
  log-uniform ``ratio``, then a centre crop clamped to ``ratio``), horizontal flip with probability
  ``hflip``, normalisation;
* evaluation: resize to ``img_size / crop_pct`` and centre crop ``img_size`` (timm's eval transform);

resizing with ``F.interpolate`` (bilinear or bicubic, antialiased like PIL's resize). Its random
draws come from torch's global generator, which every checkpoint holds. Options it does not have
(RandAugment, colour jitter, random erasing, other interpolations) keep timm's per-sample pipeline:
:func:`supports` says which.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchAugment", "supports"]

_MODES = ("bilinear", "bicubic")  # F.interpolate modes named as the config names them


def supports(cfg: dict[str, Any]) -> bool:
    """Whether :class:`BatchAugment` does everything the config asks of the data pipeline."""
    return (not cfg.get("aa") and not cfg.get("color_jitter") and not cfg.get("reprob")
            and cfg.get("interpolation") in _MODES)


class BatchAugment:
    """uint8 images (B, H, W) -> normalised float32 (B, C, S, S), training or evaluation transform.

    Args:
        cfg: the run's configuration (img_size, crop_pct, scale, ratio, hflip, interpolation).
        mean, std: per output channel.
        in_chans: 1, or 3 (the grey image replicated).
        is_training: random crop and flip, or the deterministic eval resize + centre crop.
    """

    def __init__(self, cfg: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...], in_chans: int,
                 is_training: bool) -> None:
        if not supports(cfg):
            raise ValueError("BatchAugment: the config asks for augmentations it does not implement")
        self.size = int(cfg["img_size"])
        self.crop_pct = float(cfg["crop_pct"])
        self.scale = tuple(float(s) for s in cfg["scale"])
        self.log_ratio = tuple(math.log(float(r)) for r in cfg["ratio"])
        self.hflip = float(cfg["hflip"])
        self.mode = cfg["interpolation"]
        self.in_chans = in_chans
        self.is_training = is_training
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False)

    def crop_params(self, n: int, height: int, width: int) -> Tensor:
        """(n, 4) int64 rows (top, left, h, w): torchvision's RandomResizedCrop draw, vectorised."""
        tries = 10
        area = height * width
        target = area * torch.empty(n, tries).uniform_(*self.scale)
        aspect = torch.exp(torch.empty(n, tries).uniform_(*self.log_ratio))
        w = torch.sqrt(target * aspect).round().long()
        h = torch.sqrt(target / aspect).round().long()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.long().argmax(1), torch.full((n,), -1))
        rows = torch.arange(n)
        h_pick, w_pick = h[rows, first.clamp(min=0)], w[rows, first.clamp(min=0)]
        # no try fitted: the whole image, or a centre crop clamped to the ratio range
        in_ratio = width / height
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if in_ratio < min(lo, hi):
            fw, fh = width, int(round(width / min(lo, hi)))
        elif in_ratio > max(lo, hi):
            fh, fw = height, int(round(height * max(lo, hi)))
        else:
            fw, fh = width, height
        fitted = first >= 0
        h_pick = torch.where(fitted, h_pick, torch.full_like(h_pick, fh))
        w_pick = torch.where(fitted, w_pick, torch.full_like(w_pick, fw))
        top = torch.where(fitted, (torch.rand(n) * (height - h_pick + 1)).floor().long(), (height - h_pick) // 2)
        left = torch.where(fitted, (torch.rand(n) * (width - w_pick + 1)).floor().long(), (width - w_pick) // 2)
        return torch.stack([top, left, h_pick, w_pick], 1)

    def __call__(self, images: Tensor) -> Tensor:
        x = images.unsqueeze(1).float().div_(255.0)  # (B, 1, H, W) in [0, 1], as ToTensor gives
        n, _, height, width = x.shape
        size = (self.size, self.size)
        if self.is_training:
            params = self.crop_params(n, height, width)
            if bool((params[:, 2] == height).all() and (params[:, 3] == width).all()):
                out = self._resize(x, size)  # every crop is the whole image: one batched resize
            else:
                out = torch.cat([self._resize(x[b:b + 1, :, t:t + h, l:l + w], size)
                                 for b, (t, l, h, w) in enumerate(params.tolist())])
            if self.hflip > 0:
                flip = (torch.rand(n) < self.hflip).view(n, 1, 1, 1)
                out = torch.where(flip, out.flip(-1), out)
        else:  # timm's eval transform: resize to size / crop_pct, centre crop size
            scaled = int(math.floor(self.size / self.crop_pct))
            out = self._resize(x, (scaled, scaled))
            top = int(round((scaled - self.size) / 2.0))
            out = out[..., top:top + self.size, top:top + self.size]
        if self.in_chans == 3:
            out = out.expand(-1, 3, -1, -1)
        return ((out - self.mean) / self.std).contiguous()
