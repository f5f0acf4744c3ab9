"""Segmentation data: folders of images and label masks, the reference's augmentation, loaders.

Two folder layouts (``layout: auto`` tells them apart):

- ``ade20k``: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``
  with the same stems; label 0 means "other" and is ignored (``reduce_zero_label``: 0 -> ignore,
  every other label minus 1), 150 classes.
- ``plain``: ``images/`` and ``masks/`` with matching stems, either each with ``train/`` and ``val/``
  subfolders or flat (then a fixed ``val_fraction`` of the stems, chosen by hash, validates).
  The class count comes from ``--num-classes`` or a ``classes.txt`` (one name a line) beside them;
  pixels equal to ``ignore_index`` (255 by default) are ignored.

Masks are single-channel PNGs of class indices. A mask label that is neither a class nor the ignore
index is ignored too (counted nowhere), so one stray value cannot corrupt the metric.

Training samples follow mmsegmentation 1.x's ADE20K pipeline: random resize to ``scale`` x a ratio in
``ratio_range`` (aspect kept), random crop (re-drawn up to 10 times while one class covers more than
``cat_max_ratio``), horizontal flip, photometric distortion, normalise, pad to the crop (image 0,
mask ignore). Validation images are resized to ``scale`` (aspect kept) and keep their original-size
mask: predictions are resized back before scoring, as the reference does. Every training sample's
randomness is seeded by its place in the run (:class:`PassSampler`), so a resumed run draws the same
crops as an uninterrupted one, whatever the worker count.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SegDataError(UserError):
    """A sample that cannot be used (unreadable, mask of another size)."""


@dataclass
class SplitFiles:
    images: list[str]
    masks: list[str]


@dataclass
class FolderInfo:
    layout: str
    train: SplitFiles
    val: SplitFiles
    num_classes: int
    reduce_zero_label: bool
    classes: list[str]


def _stems(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in exts and os.path.isfile(os.path.join(folder, name)):
            out.setdefault(stem, os.path.join(folder, name))
    return out


def _pair(image_dir: str, mask_dir: str) -> SplitFiles:
    """Images and masks with the same stems; a stem on one side only is an error naming it."""
    for d in (image_dir, mask_dir):
        if not os.path.isdir(d):
            raise UserError(f"segmentation data folder '{d}' is missing")
    images, masks = _stems(image_dir, IMAGE_EXTS), _stems(mask_dir, (".png",))
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) in '{image_dir}'")
    lonely = sorted(set(images) - set(masks))
    if lonely:
        raise UserError(f"{len(lonely)} image(s) in '{image_dir}' have no mask of the same stem in '{mask_dir}' "
                        f"(first: {lonely[0]}; masks are .png)")
    stems = sorted(images)
    return SplitFiles([images[s] for s in stems], [masks[s] for s in stems])


def _hash_fraction(stem: str) -> float:
    return int(hashlib.sha1(stem.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def detect_layout(root: str) -> str:
    if os.path.isdir(os.path.join(root, "annotations")) and os.path.isdir(os.path.join(root, "images")):
        return "ade20k"
    if os.path.isdir(os.path.join(root, "masks")) and os.path.isdir(os.path.join(root, "images")):
        return "plain"
    raise UserError(f"'{root}' is neither ADE20K's layout (images/ and annotations/) nor the plain one "
                    "(images/ and masks/)")


def read_classes(root: str) -> list[str] | None:
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def scan_folder(cfg: dict[str, Any]) -> FolderInfo:
    """Find the split files and resolve layout, class count and ``reduce_zero_label``."""
    root = cfg["data_dir"]
    if not root:
        raise UserError("no data: pass --data-dir DIR (ADE20K's layout, or images/ and masks/)")
    if not os.path.isdir(root):
        raise UserError(f"--data-dir '{root}' is not a folder")
    layout = detect_layout(root) if cfg["layout"] == "auto" else cfg["layout"]
    names = read_classes(root)
    if layout == "ade20k":
        train = _pair(os.path.join(root, "images", "training"), os.path.join(root, "annotations", "training"))
        val = _pair(os.path.join(root, "images", "validation"), os.path.join(root, "annotations", "validation"))
        reduce = True if cfg["reduce_zero_label"] is None else cfg["reduce_zero_label"]
        num_classes = cfg["num_classes"] or (len(names) if names else 150)
    else:
        img, msk = os.path.join(root, "images"), os.path.join(root, "masks")
        if os.path.isdir(os.path.join(img, "train")):
            train = _pair(os.path.join(img, "train"), os.path.join(msk, "train"))
            val = _pair(os.path.join(img, "val"), os.path.join(msk, "val"))
        else:
            both = _pair(img, msk)
            is_val = [_hash_fraction(os.path.splitext(os.path.basename(p))[0]) < cfg["val_fraction"] for p in both.images]
            train = SplitFiles([p for p, v in zip(both.images, is_val) if not v], [p for p, v in zip(both.masks, is_val) if not v])
            val = SplitFiles([p for p, v in zip(both.images, is_val) if v], [p for p, v in zip(both.masks, is_val) if v])
            if not train.images or not val.images:
                raise UserError(f"val_fraction {cfg['val_fraction']} leaves an empty split of {len(both.images)} images in '{img}'")
        reduce = bool(cfg["reduce_zero_label"])
        num_classes = cfg["num_classes"] or (len(names) - (1 if reduce else 0) if names else 0)
        if not num_classes:
            raise UserError(f"the plain layout needs the class count: pass --num-classes N (or put classes.txt in '{root}')")
    if names is None or len(names) != num_classes + (1 if reduce and layout == "plain" else 0):
        names = [f"class {i}" for i in range(num_classes)]
    elif reduce and layout == "plain":
        names = names[1:]
    if num_classes > cfg["ignore_index"]:
        raise UserError(f"ignore_index {cfg['ignore_index']} is a class label ({num_classes} classes); pass --ignore-index >= {num_classes}")
    return FolderInfo(layout, train, val, num_classes, reduce, names)


# --------------------------------------------------------------------------- one sample


def load_pair(image_path: str, mask_path: str, info: FolderInfo, ignore_index: int) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and its label map (int64, reduced and range-checked)."""
    try:
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise SegDataError(f"mask '{mask_path}' has mode {m.mode}: expected one channel of class indices")
            mask = np.asarray(m, dtype=np.int64).copy()
    except SegDataError:
        raise
    except (OSError, ValueError) as err:
        raise SegDataError(f"cannot read '{image_path}' / '{mask_path}': {err}") from None
    if mask.shape != (image.height, image.width):
        raise SegDataError(f"mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} but its image is {image.width}x{image.height}")
    return image, reduce_labels(mask, info.num_classes, ignore_index, info.reduce_zero_label)


def reduce_labels(mask: np.ndarray, num_classes: int, ignore_index: int, reduce_zero_label: bool) -> np.ndarray:
    """``reduce_zero_label``: 0 -> ignore, k -> k - 1 (mmseg's rule); then labels outside the classes -> ignore."""
    mask = mask.astype(np.int64)
    if reduce_zero_label:
        is_zero = mask == 0
        mask = mask - 1
        mask[is_zero] = ignore_index
        mask[mask == ignore_index - 1] = ignore_index  # mmseg: 255 - 1 = 254 stays ignored
    mask[(mask < 0) | ((mask >= num_classes) & (mask != ignore_index))] = ignore_index
    return mask


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest factor with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness (+-32), contrast (0.5-1.5) before or after
    saturation (0.5-1.5) and hue (+-18 of 180), each with probability 0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    img = np.clip(img, 0, 255)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV"), dtype=np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:  # PIL's hue spans 0-255 for 360 degrees: 18 of OpenCV's 180 is 25.5
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-25.5, 25.5)) % 256
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    if not contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    return np.clip(img, 0, 255)


def normalise(image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """(H, W, 3) 0-255 -> (3, H, W) float tensor."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


class SegTrainSet(Dataset):
    """Training crops; the key is ``(index, seed)`` from :class:`PassSampler`."""

    def __init__(self, files: SplitFiles, info: FolderInfo, cfg: dict[str, Any]) -> None:
        self.files, self.info, self.cfg = files, info, cfg

    def __len__(self) -> int:
        return len(self.files.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        cfg, rng = self.cfg, np.random.default_rng(seed)
        image, mask = load_pair(self.files.images[index], self.files.masks[index], self.info, cfg["ignore_index"])
        ratio = rng.uniform(*cfg["ratio_range"])
        w, h = rescale_size(image.width, image.height, (int(cfg["scale"][0] * ratio), int(cfg["scale"][1] * ratio)))
        image = np.asarray(image.resize((w, h), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)
        image, mask = random_crop(image, mask, cfg["crop_size"], cfg["cat_max_ratio"], cfg["ignore_index"], rng)
        if rng.random() < cfg["hflip"]:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if cfg["photometric"]:
            image = photometric(image, rng)
        return pad_to(normalise(image, cfg["mean"], cfg["std"]), torch.from_numpy(np.ascontiguousarray(mask)),
                      cfg["crop_size"], cfg["ignore_index"])


def random_crop(image: np.ndarray, mask: np.ndarray, size: int, cat_max_ratio: float, ignore_index: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's RandomCrop: up to 10 draws while the crop is dominated by one class."""
    h, w = mask.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, counts = np.unique(mask[y:y + size, x:x + size], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return image[y:y + size, x:x + size], mask[y:y + size, x:x + size]


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom / right to ``size`` (image 0 after normalisation, mask ignore), as mmseg's data preprocessor."""
    ph, pw = size - image.shape[1], size - image.shape[2]
    if ph > 0 or pw > 0:
        image = torch.nn.functional.pad(image, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
        mask = torch.nn.functional.pad(mask, (0, max(pw, 0), 0, max(ph, 0)), value=ignore_index)
    return image, mask


class SegValSet(Dataset):
    """Validation images resized to ``scale`` (aspect kept), with the original-size label map."""

    def __init__(self, files: SplitFiles, info: FolderInfo, cfg: dict[str, Any]) -> None:
        self.files, self.info, self.cfg = files, info, cfg

    def __len__(self) -> int:
        return len(self.files.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cfg = self.cfg
        image, mask = load_pair(self.files.images[index], self.files.masks[index], self.info, cfg["ignore_index"])
        w, h = rescale_size(image.width, image.height, tuple(cfg["scale"]))
        resized = np.asarray(image.resize((w, h), Image.BILINEAR))
        return {"image": normalise(resized, cfg["mean"], cfg["std"]), "mask": torch.from_numpy(mask),
                "raw": np.asarray(image), "name": os.path.basename(self.files.images[index])}


# --------------------------------------------------------------------------- the order of a run


def sample_seed(seed: int, data_pass: int, rank: int, position: int) -> int:
    return (((seed * 1_000_003 + data_pass) * 1_000_003 + rank) * 1_000_003 + position) % 2**63


class PassSampler(Sampler[tuple[int, int]]):
    """An iteration-based run's order: pass ``p`` over the training set is a permutation seeded by
    (seed, p), split between ranks; ``set_pass(p, start)`` begins at position ``start`` so a resumed
    run continues where it stopped. Yields ``(index, sample_seed)``."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_rank = (n + world - 1) // world
        self.data_pass, self.start = 0, 0

    def set_pass(self, data_pass: int, start: int = 0) -> None:
        self.data_pass, self.start = data_pass, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.data_pass)
        order = torch.randperm(self.n, generator=g).tolist()
        order = (order * self.world)[: self.per_rank * self.world]  # pad so every rank gets as many
        mine = order[self.rank::self.world]
        for pos in range(self.start, len(mine)):
            yield mine[pos], sample_seed(self.seed, self.data_pass, self.rank, pos)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class ShardSampler(Sampler[int]):
    """Validation indices of this rank (every rank scores a disjoint share; confusion matrices add)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _first(batch: list[Any]) -> Any:
    return batch[0]


def build_seg_data(cfg: dict[str, Any], rank: int = 0, world: int = 1, *, train: bool = True) -> dict[str, Any]:
    """The folder's splits as loaders: ``train_loader`` / ``train_sampler`` (when ``train``),
    ``val_loader`` (one image a batch), ``num_classes``, ``classes``, ``info``."""
    info = scan_folder(cfg)
    val_files = info.val
    if cfg["val_subset"] and cfg["val_subset"] < len(val_files.images):
        g = torch.Generator().manual_seed(cfg["seed"])
        keep = sorted(torch.randperm(len(val_files.images), generator=g)[: cfg["val_subset"]].tolist())
        val_files = SplitFiles([val_files.images[i] for i in keep], [val_files.masks[i] for i in keep])
    val_set = SegValSet(val_files, info, cfg)
    out: dict[str, Any] = {"info": info, "num_classes": info.num_classes, "classes": info.classes, "val_set": val_set}
    out["val_loader"] = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), rank, world),
                                   num_workers=min(cfg["workers"], 2), collate_fn=_first)
    if train:
        train_set = SegTrainSet(info.train, info, cfg)
        if len(train_set) < cfg["batch_size"] * world:
            raise UserError(f"{len(train_set)} training images are fewer than one batch ({cfg['batch_size']} x {world} processes)")
        sampler = PassSampler(len(train_set), cfg["seed"], rank, world)
        out["train_sampler"] = sampler
        # its own generator: a new iterator's base seed would otherwise be drawn from the global RNG,
        # and a resumed run (which starts a new iterator mid-pass) would see other dropout draws
        out["train_loader"] = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler, drop_last=True,
                                         num_workers=cfg["workers"], generator=torch.Generator().manual_seed(cfg["seed"]))
        out["batches_per_pass"] = sampler.per_rank // cfg["batch_size"]
    return out
