"""Data pipeline: PIL ImageFolder, corrupt-image skipping, channels, Fashion-MNIST IDX reading."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import shufflemamba  # noqa: F401
from shufflemamba.errors import UserError
from shufflemamba.training.config import resolve_config
from shufflemamba.training.data import FMNIST_DIR, FashionMNIST, ImageFolderPIL, build_loaders, collate_skip, read_idx


def _folder(root, classes=("a", "b"), n=4, size=12, split="train"):
    for c in classes:
        d = os.path.join(root, split, c)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(os.path.join(d, f"{i}.png"))
    return root


def _cfg(**kw):
    return resolve_config(None, {"img_size": 8, "batch_size": 2, "workers": 0, "crop_pct": 1.0, **kw})


def test_corrupt_image_is_skipped_warned_and_counted(tmp_path, capfd):
    root = _folder(str(tmp_path), n=3)
    bad = os.path.join(root, "train", "a", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    ds = ImageFolderPIL(os.path.join(root, "train"), transform=lambda im: torch.from_numpy(np.array(im)))
    assert len(ds) == 7 and ds.classes == ["a", "b"]
    idx = [p for p, _ in ds.samples].index(bad)
    assert ds[idx] is None
    assert "broken.jpg" in capfd.readouterr().err
    images, targets, skipped = collate_skip([ds[0], ds[idx], ds[1]])
    assert skipped == 1 and len(images) == 2 and targets.tolist() == [0, 0]


def test_channels_follow_in_chans(tmp_path):
    root = _folder(str(tmp_path))
    _folder(root, split="val")
    for in_chans in (1, 3):
        out = build_loaders(_cfg(data_dir=root), in_chans)
        x, y, skipped = next(iter(out["train_loader"]))
        assert x.shape == (2, in_chans, 8, 8) and skipped == 0
        xv, _, _ = next(iter(out["val_loader"]))
        assert xv.shape[1:] == (in_chans, 8, 8)
        assert out["num_classes"] == 2


def test_class_mismatch_and_missing_dirs(tmp_path):
    root = _folder(str(tmp_path), classes=("a", "b"))
    _folder(root, classes=("a", "c"), split="val")
    with pytest.raises(UserError, match="class folders differ"):
        build_loaders(_cfg(data_dir=root), 3)
    with pytest.raises(UserError, match="does not exist"):
        build_loaders(_cfg(data_dir=str(tmp_path / "nope")), 3)
    os.makedirs(tmp_path / "empty" / "val")
    with pytest.raises(UserError, match="no class sub-directories"):
        build_loaders(_cfg(data_dir=str(tmp_path / "empty")), 3)
    with pytest.raises(UserError, match="--data-dir"):
        build_loaders(_cfg(), 3)


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_files_in_data_dir(tmp_path):
    imgs = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 251
    labels = np.array([3, 1, 4, 1, 5])
    for split, (fi, fl) in {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                            "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}.items():
        _write_idx(str(tmp_path / fi), imgs)
        _write_idx(str(tmp_path / fl), labels)
    assert np.array_equal(read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz")), imgs)
    ds = FashionMNIST(str(tmp_path), "val", mode="L")
    img, y = ds[2]
    assert y == 4 and np.array_equal(np.asarray(img), imgs[2])
    rgb, _ = FashionMNIST(str(tmp_path), "train", mode="RGB")[0]
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 2], imgs[0])


def test_missing_fashion_mnist_explains_apt(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path), "train")


@pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_reads():
    out = build_loaders(_cfg(dataset="fashion-mnist", img_size=28, val_subset=16, mean=[0.286], std=[0.353]), 1, train=False)
    assert out["num_classes"] == 10 and len(out["val_loader"].dataset) == 16
    x, y, _ = next(iter(out["val_loader"]))
    assert x.shape == (2, 1, 28, 28) and y.dtype == torch.long
    ds = FashionMNIST(None, "train")
    assert len(ds) == 60000 and set(np.unique(ds.targets)) == set(range(10))


def _image_bytes(ds, i):
    x = ds[i][0]
    return x.numpy().tobytes()


def test_holdout_validates_on_training_images_never_trained_on(tmp_path):
    # 2 classes x 10 train images, each image distinct; val/ has its own 2 x 3 images
    root = str(tmp_path)
    for c, base in (("a", 0), ("b", 100)):
        d = os.path.join(root, "train", c)
        os.makedirs(d)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), base + i, np.uint8)).save(os.path.join(d, f"{i}.png"))
    _folder(root, n=3, size=8, split="val")
    cfg = _cfg(data_dir=root, holdout=6, train_subset=8, hflip=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0], seed=3)
    out = build_loaders(cfg, 3)
    val, train = out["val_loader"].dataset, out["train_loader"].dataset.dataset
    assert len(val) == 6 and len(train) == 8
    val_pixels = {val[i][0][0, 0, 0].item() for i in range(len(val))}
    train_pixels = {train[i][0][0, 0, 0].item() for i in range(len(train))}
    assert not val_pixels & train_pixels  # disjoint: no held-out image is trained on
    # the same seed draws the same held-out images; another seed draws others
    again = build_loaders(cfg, 3, train=False)["val_loader"].dataset
    assert {again[i][0][0, 0, 0].item() for i in range(6)} == val_pixels
    other = build_loaders({**cfg, "seed": 4}, 3, train=False)["val_loader"].dataset
    assert {other[i][0][0, 0, 0].item() for i in range(6)} != val_pixels
    # without holdout the val loader reads val/ (6 images)
    assert len(build_loaders({**cfg, "holdout": None}, 3, train=False)["val_loader"].dataset) == 6


def test_holdout_too_large_is_a_user_error(tmp_path):
    root = _folder(str(tmp_path), n=3)
    _folder(root, n=1, split="val")
    with pytest.raises(UserError, match="holdout 6 leaves no training images"):
        build_loaders(_cfg(data_dir=root, holdout=6), 3)


def test_fashion_mnist_loaders_transform_whole_batches(tmp_path):
    """The in-memory dataset goes through the batched transform (through Subset for train_subset
    and holdout too) when the config allows it, and through timm's per-sample one when it does not."""
    from shufflemamba.training.batch_aug import BatchAugment

    imgs = np.arange(40 * 28 * 28).reshape(40, 28, 28) % 251
    labels = np.arange(40) % 10
    for fi, fl in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                   ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        _write_idx(str(tmp_path / fi), imgs)
        _write_idx(str(tmp_path / fl), labels)
    base = dict(dataset="fashion-mnist", data_dir=str(tmp_path), img_size=20, mean=[0.286], std=[0.353],
                scale=[0.5, 1.0], ratio=[0.9, 1.1], interpolation="bilinear", batch_size=4, train_subset=20,
                holdout=8, aa=None, color_jitter=0.0, reprob=0.0)
    out = build_loaders(_cfg(**base), 1, train=True)
    out["train_sampler"].set_epoch(0)
    x, y, skipped = next(iter(out["train_loader"]))
    assert x.shape == (4, 1, 20, 20) and y.shape == (4,) and skipped == 0
    xv, _, _ = next(iter(out["val_loader"]))
    assert xv.shape == (4, 1, 20, 20)
    train_base = out["train_loader"].dataset.dataset
    while not isinstance(train_base, FashionMNIST):
        train_base = train_base.dataset
    assert isinstance(train_base.batch_transform, BatchAugment) and train_base.batch_transform.is_training
    per_sample = build_loaders(_cfg(**{**base, "reprob": 0.25}), 1, train=False)
    assert per_sample["val_loader"].dataset.dataset.batch_transform is None
