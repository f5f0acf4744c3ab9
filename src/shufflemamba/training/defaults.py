"""Defaults a run derives from its data when its config leaves them open (``None`` = auto).

The presets set every one of these keys, so they train with their exact reference values; a run
with no preset (``shufflemamba train --data-dir my_images``) gets values that learn on a small
folder in a single process, and :func:`fill_auto_defaults` says what it chose and why, once.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from ..errors import UserError

DEFAULT_MODEL = "vim_tiny_patch16_224"
BASE_LR = 5e-4  # at total batch 512, the DeiT rule; small runs keep it unscaled (see _lr)
MAX_AUTO_SIZE = 224
MAX_AUTO_BATCH = 128
WARMUP_FRACTION = 0.1  # auto warmup: at most this share of the run (and never over 5 epochs)
HOLDOUT_FRACTION = 0.1  # a folder without train/ and val/: this share of it validates


def data_layout(data_dir: str) -> str:
    """``"split"`` for ``DIR/train/<class>/...`` + ``DIR/val/<class>/...``, ``"flat"`` for
    ``DIR/<class>/...`` (the run holds part of it out to validate)."""
    if os.path.isdir(os.path.join(data_dir, "train")) or os.path.isdir(os.path.join(data_dir, "val")):
        return "split"
    if os.path.isdir(data_dir) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(data_dir)):
        return "flat"
    return "split"  # the data loader names what is missing


def _image_sides(folder: str, limit: int = 64) -> list[int]:
    """The shorter side of up to ``limit`` images spread over ``folder``'s classes (headers only)."""
    from PIL import Image

    paths: list[str] = []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        paths += [os.path.join(dirpath, f) for f in sorted(files) if not f.startswith(".")]
    step = max(1, len(paths) // limit)
    sides = []
    for path in paths[::step][:limit]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue  # not an image: the loader skips it with a warning of its own
    return sides


def _count_images(folder: str) -> int:
    return sum(len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(folder, followlinks=True))


def _train_folder(cfg: dict[str, Any]) -> str | None:
    if cfg["dataset"] is not None or not cfg["data_dir"]:
        return None
    if data_layout(cfg["data_dir"]) == "flat":
        return cfg["data_dir"]
    return os.path.join(cfg["data_dir"], "train")


def _patch_for(img_size: int) -> int:
    """The largest of 16 / 8 / 4 that still leaves 8 patches a side (fewer tokens than that and a Vim has
    little sequence to scan)."""
    for patch in (16, 8, 4):
        if img_size // patch >= 8:
            return patch
    return 4


def _lr(total_batch: int) -> float:
    """The DeiT rule scales 5e-4 by total batch / 512, which leaves a 32-image batch at 3e-5: too
    little for a short run. Auto: 5e-4 up to batch 512, scaled above it."""
    return BASE_LR * max(1.0, total_batch / 512)


def new_run_folder(cfg: dict[str, Any], source: str | None, root: str = "runs") -> str:
    """``runs/<preset or model>-<date>-<time>``, never an existing folder."""
    name = os.path.splitext(os.path.basename(source))[0] if source else cfg["model"]
    base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return os.path.abspath(path)


def inherit_architecture(cfg: dict[str, Any], ckpt: dict[str, Any], source: str) -> list[str]:
    """``--init-from``: the checkpoint's model, its keyword arguments (but its class count) and image
    size, for what the config leaves open."""
    notes = []
    name, kwargs = ckpt.get("model_name"), dict(ckpt.get("model_kwargs") or {})
    if cfg["model"] is None and name:
        cfg["model"] = name
        notes.append(f"model {name} (from --init-from {source})")
    if cfg["model"] != name:
        return notes  # another architecture: init_from_checkpoint loads what fits
    kwargs.pop("num_classes", None)  # the new data decides (the head is re-initialised)
    size = kwargs.pop("img_size", None)
    inherited = {k: v for k, v in kwargs.items() if k not in cfg["model_kwargs"]}
    cfg["model_kwargs"] = {**inherited, **cfg["model_kwargs"]}
    if inherited:
        notes.append(f"model_kwargs {inherited} (from --init-from {source})")
    if cfg["img_size"] is None and size is not None:
        cfg["img_size"] = int(size)
        notes.append(f"img_size {size} (from --init-from {source})")
    return notes


def fill_auto_defaults(cfg: dict[str, Any], *, init_ckpt: dict[str, Any] | None = None,
                       init_source: str | None = None) -> list[str]:
    """Fill every auto (``None``) key of a new run's config; returns one line per value: what and why."""
    notes = inherit_architecture(cfg, init_ckpt, init_source or "") if init_ckpt is not None else []
    if cfg["model"] is None:
        cfg["model"] = DEFAULT_MODEL
    folder = _train_folder(cfg)
    flat_without_holdout = folder is not None and folder == cfg["data_dir"] and cfg["holdout"] is None
    # one walk of the folder, and only when a derived value needs the count (a preset run needs none)
    counted = (flat_without_holdout or cfg["batch_size"] is None) and folder is not None and os.path.isdir(folder)
    n_images = _count_images(folder) if counted else None
    if flat_without_holdout:
        n = n_images
        cfg["holdout"] = max(1, round(n * HOLDOUT_FRACTION))
        notes.append(f"holdout {cfg['holdout']} ({cfg['data_dir']} has class folders but no train/ and val/: "
                     f"{HOLDOUT_FRACTION:.0%} of its {n} images validate)")
    if cfg["img_size"] is None:
        cfg["img_size"] = _auto_img_size(cfg, folder, notes)
    if _is_vim(cfg["model"]) and not {"patch_size", "stride"} & set(cfg["model_kwargs"]) and cfg["img_size"] < 128:
        patch = _patch_for(cfg["img_size"])
        if patch != 16:
            cfg["model_kwargs"] = {**cfg["model_kwargs"], "patch_size": patch}
            side = cfg["img_size"] // patch
            notes.append(f"model_kwargs patch_size={patch} ({cfg['img_size']} px: {side} x {side} patches; "
                         f"patch 16 would leave {max(cfg['img_size'] // 16, 0)} a side)")
    if cfg["batch_size"] is None:
        cfg["batch_size"] = _auto_batch(cfg, n_images, notes)
    if cfg["warmup_epochs"] is None:
        cfg["warmup_epochs"] = round(min(5.0, WARMUP_FRACTION * cfg["epochs"]), 3)
        epochs = f"{cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''}"
        notes.append(f"warmup_epochs {cfg['warmup_epochs']:g} ({WARMUP_FRACTION:.0%} of {epochs}, at most 5)")
    elif cfg["warmup_epochs"] >= cfg["epochs"] > 0:
        notes.append(f"warning: warmup_epochs {cfg['warmup_epochs']:g} is not shorter than the run's {cfg['epochs']} "
                     "epochs: the lr never reaches its peak")
    if cfg["lr"] is None:
        total = cfg["batch_size"] * cfg["accum_steps"] * _world_size()
        cfg["lr"], cfg["scale_lr"] = _lr(total), False
        why = "not scaled down below batch 512" if total <= 512 else f"5e-4 x {total} / 512"
        notes.append(f"lr {cfg['lr']:.3g} at total batch {total} ({why})")
    return notes


def _is_vim(name: str) -> bool:
    return name.startswith(("vim_", "shufflemamba_", "mambar_"))


def _world_size() -> int:
    env = os.environ.get("WORLD_SIZE", "1")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def _auto_img_size(cfg: dict[str, Any], folder: str | None, notes: list[str]) -> int:
    if cfg["dataset"] == "fashion-mnist":
        notes.append("img_size 28 (Fashion-MNIST's own size)")
        return 28
    if folder is None or not os.path.isdir(folder):
        notes.append(f"img_size {MAX_AUTO_SIZE} (no image folder to measure)")
        return MAX_AUTO_SIZE
    sides = _image_sides(folder)
    if not sides:
        raise UserError(f"no readable images in '{folder}' to take the image size from; pass --img-size")
    median = int(statistics.median(sides))
    size = max(16, min(MAX_AUTO_SIZE, median // 16 * 16 if median >= 64 else median // 4 * 4))
    why = f"median shorter side {median} px of {len(sides)} images"
    notes.append(f"img_size {size} ({why}{', capped' if median > MAX_AUTO_SIZE else ''})")
    return size


def _auto_batch(cfg: dict[str, Any], n_images: int | None, notes: list[str]) -> int:
    if n_images is None:
        return MAX_AUTO_BATCH
    n = n_images - (cfg["holdout"] or 0)
    if cfg["train_subset"]:
        n = min(n, cfg["train_subset"])
    batch = MAX_AUTO_BATCH
    while batch > 1 and batch * 8 > n:  # at least 8 steps an epoch
        batch //= 2
    if batch < MAX_AUTO_BATCH:
        notes.append(f"batch_size {batch} ({n} training images: at least 8 steps an epoch)")
    return batch
