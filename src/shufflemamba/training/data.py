"""Datasets, transforms and loaders: ImageFolder-layout directories and Fashion-MNIST (IDX files).

Images are decoded with PIL (never torchvision.io, whose compiled ops may not load here). A corrupt or
unreadable image is skipped: the dataset warns once naming the file and returns ``None``;
:func:`collate_skip` drops those samples from the batch and reports how many it dropped, so the
training loop can count them. The run goes on with a slightly smaller batch.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import sys
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from ..errors import UserError
from .defaults import data_layout

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


class ImageFolderPIL(Dataset):
    """``root/<class>/<image>`` decoded with PIL; classes are the sorted sub-directory names.

    Args:
        root: split directory (e.g. ``data/train``).
        transform: applied to the PIL image.
        mode: PIL mode the image is converted to (``"RGB"`` or ``"L"``).
    """

    def __init__(self, root: str, transform: Callable | None = None, mode: str = "RGB") -> None:
        if not os.path.isdir(root):
            raise UserError(f"data directory '{root}' does not exist")
        self.root, self.transform, self.mode = root, transform, mode
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise UserError(f"data directory '{root}' has no class sub-directories")
        exts = _image_extensions()
        self.samples: list[tuple[str, int]] = []
        for idx, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in exts and not name.startswith("."):
                        self.samples.append((os.path.join(dirpath, name), idx))
        if not self.samples:
            raise UserError(f"data directory '{root}' has no images")
        self.targets = [t for _, t in self.samples]
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)  # forces the full decode inside the try
        except Exception as err:  # PIL raises many types for broken files
            if path not in self._warned:  # once per file and worker process
                self._warned.add(path)
                print(f"warning: skipping unreadable image {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): uint8 array of shape given by its header."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the original IDX .gz files (Debian package ``dataset-fashion-mnist``).

    Args:
        root: directory holding the four IDX files; default the Debian location.
        split: ``"train"`` (60k) or ``"val"`` (the 10k test set).
        transform: applied to the 28x28 PIL image.
        mode: ``"L"`` keeps one channel; ``"RGB"`` replicates it to three.
        batch_transform: a :class:`~shufflemamba.batch_aug.BatchAugment` that transforms the
            uint8 images of a whole batch at once (``__getitems__``, which the DataLoader calls
            with a batch's indices); ``transform`` is then unused.
    """

    classes = FMNIST_CLASSES

    def __init__(self, root: str | None = None, split: str = "train", transform: Callable | None = None, mode: str = "L",
                 batch_transform: Callable | None = None) -> None:
        root = root or FMNIST_DIR
        img_file, lbl_file = FMNIST_FILES[split]
        paths = [os.path.join(root, img_file), os.path.join(root, lbl_file)]
        missing = [p for p in paths if not os.path.isfile(p) and not os.path.isfile(p[:-3])]
        if missing:
            raise UserError(
                f"Fashion-MNIST file {missing[0]} not found; install it with "
                "`sudo apt-get install dataset-fashion-mnist` (or pass --data-dir holding the IDX files)"
            )
        paths = [p if os.path.isfile(p) else p[:-3] for p in paths]
        self.images = read_idx(paths[0])  # (N, 28, 28) uint8
        self.targets = read_idx(paths[1]).astype(np.int64)  # (N,)
        if len(self.images) != len(self.targets):
            raise UserError(f"Fashion-MNIST files in {root} disagree on the number of samples")
        self.transform, self.mode, self.batch_transform = transform, mode, batch_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        """A batch's samples; with a ``batch_transform``, transformed together as one tensor."""
        if self.batch_transform is None:
            return [self[i] for i in indices]
        images = self.batch_transform(torch.from_numpy(self.images[np.asarray(indices, dtype=np.int64)]))
        return list(zip(images.unbind(0), self.targets[indices].tolist()))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.batch_transform is not None:
            return self.__getitems__([index])[0]
        img = Image.fromarray(self.images[index], mode="L")
        if self.mode != "L":
            img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate, dropping samples the dataset returned as ``None``; returns (images, targets, n_skipped)."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([b[0] for b in kept])
    targets = torch.tensor([b[1] for b in kept], dtype=torch.long)
    return images, targets, skipped


def norm_stats(cfg: dict[str, Any], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std with one value per input channel."""
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    if len(mean) != in_chans:
        mean = (sum(mean) / len(mean),) * in_chans if len(mean) != 1 else mean * in_chans
    if len(std) != in_chans:
        std = (sum(std) / len(std),) * in_chans if len(std) != 1 else std * in_chans
    return mean, std


def build_transform(cfg: dict[str, Any], in_chans: int, is_training: bool) -> Callable:
    """timm transform: RandomResizedCrop / flip / RandAugment / jitter / erasing for training,
    resize + centre crop (``crop_pct``) for evaluation."""
    from timm.data import create_transform

    mean, std = norm_stats(cfg, in_chans)
    common = dict(input_size=(in_chans, cfg["img_size"], cfg["img_size"]), interpolation=cfg["interpolation"], mean=mean, std=std)
    if not is_training:
        return create_transform(**common, is_training=False, crop_pct=cfg["crop_pct"])
    return create_transform(
        **common,
        is_training=True,
        scale=tuple(cfg["scale"]),
        ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"],
        color_jitter=cfg["color_jitter"] or None,
        auto_augment=cfg["aa"] or None,
        re_prob=cfg["reprob"],
        re_mode=cfg["remode"],
    )


def build_dataset(cfg: dict[str, Any], split: str, in_chans: int, transform: Callable | None,
                  is_training: bool | None = None) -> Dataset:
    """The ``split`` ("train" or "val") dataset the config names. Grayscale stays one channel when
    ``in_chans == 1``; otherwise images are converted to RGB (grayscale replicated).

    Fashion-MNIST, held in memory, is transformed a batch at a time (:mod:`shufflemamba.batch_aug`,
    the training transform when ``is_training``, else the eval one) whenever the config asks only
    for what that does; otherwise, and for image folders, ``transform`` runs per sample."""
    mode = "L" if in_chans == 1 else "RGB"
    if in_chans not in (1, 3):
        raise UserError(f"in_chans must be 1 or 3 for image data, got {in_chans}")
    if cfg["dataset"] == "fashion-mnist":
        from . import batch_aug

        if is_training is not None and batch_aug.supports(cfg):
            batched = batch_aug.BatchAugment(cfg, *norm_stats(cfg, in_chans), in_chans, is_training)
            return FashionMNIST(cfg["data_dir"], split, None, mode, batch_transform=batched)
        return FashionMNIST(cfg["data_dir"], split, transform, mode)
    if not cfg["data_dir"]:
        raise UserError("no data: pass --data-dir DIR (class folders, or train/ and val/ with class folders) "
                        "or --dataset fashion-mnist")
    if not os.path.isdir(cfg["data_dir"]):
        raise UserError(f"data directory '{cfg['data_dir']}' does not exist")
    if data_layout(cfg["data_dir"]) == "flat":  # DIR/<class>/...: both splits read it; holdout picks val
        return ImageFolderPIL(cfg["data_dir"], transform, mode)
    root = os.path.join(cfg["data_dir"], split)
    if not os.path.isdir(root):
        raise UserError(f"data directory '{cfg['data_dir']}' has no {split}/ sub-directory")
    return ImageFolderPIL(root, transform, mode)


def class_names(ds: Dataset) -> list[str]:
    base = ds.dataset if isinstance(ds, Subset) else ds
    return list(base.classes)


def subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``n`` samples (all of them when n is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    return Subset(ds, idx)


def holdout_split(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (training pool, held-out validation) indices, both sorted.

    The held-out images are a fixed random draw for ``seed`` and never enter training; a
    ``train_subset`` is then drawn from the pool, so it is disjoint from them.

    Raises:
        UserError: ``holdout`` leaves no training images.
    """
    if holdout >= n:
        raise UserError(f"holdout {holdout} leaves no training images (the training split has {n})")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return perm[holdout:].sort().values.tolist(), perm[:holdout].sort().values.tolist()


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of one training sample's augmentation: a function of where it falls in the run."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + rank) * 1_000_003 + position) % 2**63


class EpochSampler(Sampler[tuple[int, int]]):
    """The training order, resumable mid-epoch. Wraps the epoch-seeded ``base`` sampler (the order is
    a function of seed and epoch) and yields ``(index, sample_seed)`` for :class:`SeededSamples`.

    ``set_epoch(epoch, start)`` begins the epoch's order at position ``start`` (batches done x batch
    size): a resumed epoch sees exactly the images it had not seen yet, in the same order.
    """

    def __init__(self, base: Sampler[int], seed: int, rank: int) -> None:
        self.base, self.seed, self.rank = base, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.base.set_epoch(epoch)  # type: ignore[attr-defined]
        self.epoch, self.start = epoch, start

    def __iter__(self):
        for pos, index in enumerate(self.base):
            if pos >= self.start:
                yield index, sample_seed(self.seed, self.epoch, self.rank, pos)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)  # type: ignore[arg-type]


class SeededSamples(Dataset):
    """Training samples whose random augmentation is exactly reproducible after a resume.

    In a loader worker, each sample's augmentation is seeded by :func:`sample_seed` (its run, epoch,
    rank and position): workers restart on a resume, and their RNG streams would otherwise restart
    with them. In the main process (``workers 0``) augmentation draws from the global RNGs, whose
    states every checkpoint holds, so nothing needs seeding (and nothing is spent on it).
    The key is ``(index, seed)`` from :class:`EpochSampler`.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:  # a worker's RNGs serve its samples only
            _seed_all(seed)
        return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch: through the dataset's own ``__getitems__`` when it has one (batched transforms;
        in a worker seeded once, by the batch's first sample), else sample by sample."""
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return [self[key] for key in keys]
        if get_worker_info() is not None:
            _seed_all(keys[0][1])
        return getitems([index for index, _ in keys])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r gets indices r, r + world, ... No padding, so summing the per-rank
    counts over ranks gives exact totals (timm's/torch's distributed samplers pad with repeats)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(cfg: dict[str, Any], in_chans: int, rank: int = 0, world: int = 1, train: bool = True) -> dict[str, Any]:
    """Datasets and loaders. Returns dict with val_loader, num_classes and, when ``train``,
    train_loader and train_sampler (an :class:`EpochSampler`: call ``set_epoch`` on it each epoch).

    Raises:
        UserError: missing/empty data, or train and val class folders that differ.
    """
    out: dict[str, Any] = {}
    eval_transform = build_transform(cfg, in_chans, is_training=False)
    val_ds = build_dataset(cfg, "val", in_chans, eval_transform, is_training=False)
    classes = class_names(val_ds)
    pool = None
    if cfg.get("holdout"):
        # validate on held-out training images (eval transform); the val/ split stays unseen
        train_eval = build_dataset(cfg, "train", in_chans, eval_transform, is_training=False)
        pool, held = holdout_split(len(train_eval), cfg["holdout"], cfg["seed"])
        val_ds = Subset(train_eval, held)
    if train:
        train_ds = build_dataset(cfg, "train", in_chans, build_transform(cfg, in_chans, is_training=True), is_training=True)
        train_classes = class_names(train_ds)
        if train_classes != classes:
            diff = sorted(set(train_classes) ^ set(classes))
            raise UserError(f"train/ and val/ class folders differ: {', '.join(diff[:5]) or 'order differs'}")
        if pool is not None:
            train_ds = Subset(train_ds, pool)
        train_ds = subset(train_ds, cfg["train_subset"], cfg["seed"])
        if cfg["repeated_aug"] and world > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            sampler = RepeatAugSampler(train_ds, num_replicas=world, rank=rank, shuffle=True)
        else:
            # also used with world == 1: the order is a function of (seed, epoch), so resume is exact
            sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"], drop_last=True)
        sampler = EpochSampler(sampler, cfg["seed"], rank)
        per_rank = len(sampler)
        if per_rank < cfg["batch_size"]:
            raise UserError(f"training set too small: {per_rank} images per process for batch size {cfg['batch_size']}")
        out["train_loader"] = DataLoader(
            SeededSamples(train_ds), batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["workers"], drop_last=True,
            # its own generator: starting an epoch's iterator must not draw from the global RNG, or
            # a resumed epoch (which starts one mid-way) would shift the model's random stream
            generator=torch.Generator().manual_seed(cfg["seed"]),
            collate_fn=collate_skip, pin_memory=torch.cuda.is_available(), persistent_workers=cfg["workers"] > 0,
        )
        out["train_sampler"] = sampler
    val_ds = subset(val_ds, cfg["val_subset"], cfg["seed"])
    out["val_loader"] = DataLoader(
        val_ds, batch_size=cfg["batch_size"], sampler=ShardSampler(len(val_ds), rank, world),
        num_workers=cfg["workers"], collate_fn=collate_skip, pin_memory=torch.cuda.is_available(),
    )
    out["num_classes"] = len(classes)
    out["classes"] = classes
    return out
