"""Timing shared by the measuring tools: interleaved repeats and one training step to time."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..training.optim import fused_adam_supported


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, run round-robin so drifts in machine load hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def make_model(name: str, quick: bool, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    """A timm model on ``device``; ``quick``: a tiny stand-in with the same code paths (2 blocks, 32 px)."""
    import timm

    if quick:
        kwargs.update(img_size=32, depth=2)
    return timm.create_model(name, num_classes=10 if quick else 1000, **kwargs).to(device)


def train_step_fn(model: torch.nn.Module, batch: int, img: int, device: torch.device,
                  amp: torch.dtype | None, in_chans: int = 3) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, AdamW) on a fixed random batch."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused_adam_supported(params))  # as training builds it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, img, img, generator=g).to(device)
    num_classes = model.num_classes if hasattr(model, "num_classes") else 1000
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
