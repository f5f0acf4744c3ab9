"""Training-loader throughput of a config: the batched Fashion-MNIST transform against timm's per-image one.

    python benchmarks/bench_loader.py --config demo --batches 150 --rounds 3

Builds the config's training loader twice in one process, once as the package builds it (batched
augmentation, ``shufflemamba.batch_aug``, when the config allows) and once with the batched path
switched off (timm's PIL transforms, image by image), and times ``--batches`` batches of each,
alternating for ``--rounds``. Prints images/s and the seconds a 60,000-image epoch would spend
loading. Not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.bench.report import cpu_model
from shufflemamba.training import batch_aug
from shufflemamba.training.config import resolve_config
from shufflemamba.training.data import build_loaders


def images_per_second(cfg: dict, batches: int, batched: bool) -> float:
    supports = batch_aug.supports
    if not batched:
        batch_aug.supports = lambda cfg: False  # the per-image timm path
    try:
        loaders = build_loaders(cfg, in_chans=1)
    finally:
        batch_aug.supports = supports
    loaders["train_sampler"].set_epoch(0)
    n, t0 = 0, time.perf_counter()
    for i, (x, _, _) in enumerate(loaders["train_loader"]):
        n += x.shape[0]
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = resolve_config(args.config, {"workers": 0})
    rates: dict[str, list[float]] = {"batched": [], "per-image": []}
    for _ in range(args.rounds):
        for mode in rates:
            rates[mode].append(images_per_second(cfg, args.batches, mode == "batched"))
    print(f"{cpu_model()}, 1 thread, config {args.config} (img_size {cfg['img_size']}), {args.batches} batches of "
          f"{cfg['batch_size']}, median of {args.rounds} alternating rounds:")
    for mode, r in rates.items():
        med = statistics.median(r)
        print(f"  {mode:9s} {med:8.0f} img/s  -> {60000 / med:5.1f} s per 60,000-image epoch")
    return 0


if __name__ == "__main__":
    from shufflemamba.console import guarded  # a bad --config: one "error:" line and exit 2

    sys.exit(guarded(main, sys.argv[1:]))
