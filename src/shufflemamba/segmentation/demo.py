"""A small segmentation data set made from real images: Fashion-MNIST items composed into scenes.

Each scene is a ``size`` x ``size`` RGB canvas with a smooth random colour background (class 0) and
2 to 4 Fashion-MNIST items (classes 1..10) at random positions and scales, each tinted a random
colour and blended by its own intensity; a pixel's label is the class of the topmost item that
covers it (intensity above a quarter), else background. Training scenes use the training images,
validation scenes the test images. Everything follows from ``seed``, and the result is the plain
folder layout (``images/{train,val}``, ``masks/{train,val}``, ``classes.txt``), so the demo goes
through the same loader as a user's folder.

    python -m shufflemamba.segmentation.demo --output runs/seg_demo_data
    shufflemamba train --config seg_demo --data-dir runs/seg_demo_data --output runs/seg_demo
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

from ..errors import UserError
from ..training.data import FMNIST_CLASSES, FMNIST_DIR, FashionMNIST

CLASSES = ["background", *FMNIST_CLASSES]


def compose_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 scene and its (size, size) uint8 label map."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    c0, c1, c2 = (rng.uniform(0, 200, 3) for _ in range(3))
    bg = c0 + np.einsum("hw,c->hwc", xx, c1 - c0) * 0.6 + np.einsum("hw,c->hwc", yy, c2 - c0) * 0.4
    canvas = np.clip(bg + rng.normal(0, 6, (size, size, 3)), 0, 255)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(len(items)))
        side = int(round(28 * rng.uniform(1.0, min(2.0, size / 28))))
        item = np.asarray(Image.fromarray(items[k]).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
        y, x = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - canvas[y:y + side, x:x + side].mean((0, 1))).max() < 60:  # stand out from the background
            colour = rng.uniform(0, 255, 3)
        alpha = item[..., None]
        canvas[y:y + side, x:x + side] = canvas[y:y + side, x:x + side] * (1 - alpha) + colour * alpha
        mask[y:y + side, x:x + side][item > 0.25] = labels[k] + 1
    return canvas.astype(np.uint8), mask


def generate(output: str, *, n_train: int = 800, n_val: int = 100, size: int = 96, seed: int = 0,
             fmnist_dir: str | None = None) -> str:
    """Write the scene set under ``output`` (replacing nothing: an existing non-empty folder is an error
    unless it holds exactly this set already, which is then kept). Returns ``output``."""
    stamp = f"fashion-mnist scenes: train {n_train} val {n_val} size {size} seed {seed}\n"
    stamp_path = os.path.join(output, "SCENES")
    if os.path.isdir(output) and os.listdir(output):
        if os.path.isfile(stamp_path) and open(stamp_path, encoding="utf-8").read() == stamp:
            return output
        raise UserError(f"'{output}' is not empty and not this scene set; pick another --output")
    for split, n, source in (("train", n_train, "train"), ("val", n_val, "val")):
        ds = FashionMNIST(fmnist_dir or FMNIST_DIR, split=source)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        img_dir, mask_dir = os.path.join(output, "images", split), os.path.join(output, "masks", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        for i in range(n):
            image, mask = compose_scene(rng, ds.images, ds.targets, size)
            Image.fromarray(image).save(os.path.join(img_dir, f"{split}_{i:05d}.png"))
            Image.fromarray(mask, mode="L").save(os.path.join(mask_dir, f"{split}_{i:05d}.png"))
    with open(os.path.join(output, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASSES) + "\n")
    with open(stamp_path, "w", encoding="utf-8") as f:
        f.write(stamp)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shufflemamba.segmentation.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmnist-dir", help=f"Fashion-MNIST IDX files (default {FMNIST_DIR})")
    args = p.parse_args(argv)
    if args.size < 28 or args.train < 1 or args.val < 1:
        print("error: --size must be >= 28 and --train / --val >= 1", file=sys.stderr)
        return 2
    try:
        out = generate(args.output, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed,
                       fmnist_dir=args.fmnist_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"scenes in {out}: {args.train} train / {args.val} val, {args.size} px, {len(CLASSES)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
