"""Batched augmentation of in-memory images (batch_aug.py) against timm's per-sample pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.training import batch_aug
from shufflemamba.training.config import DEFAULTS
from shufflemamba.training.data import FashionMNIST, build_transform, norm_stats


def _cfg(**kw):
    cfg = dict(DEFAULTS)
    cfg.update(img_size=20, crop_pct=1.0, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, interpolation="bilinear",
               mean=[0.286], std=[0.353])
    cfg.update(kw)
    return cfg


def _images(n=6, seed=0):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize("img_size, crop_pct, interpolation", [(20, 1.0, "bilinear"), (28, 1.0, "bilinear"),
                                                                (24, 0.875, "bicubic")])
def test_eval_transform_matches_timm_per_sample(img_size, crop_pct, interpolation):
    cfg = _cfg(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation)
    imgs = _images()
    ours = batch_aug.BatchAugment(cfg, *norm_stats(cfg, 1), 1, is_training=False)(imgs)
    timm_tf = build_transform(cfg, 1, is_training=False)
    ref = torch.stack([timm_tf(Image.fromarray(im.numpy(), mode="L")) for im in imgs])
    assert ours.shape == ref.shape == (len(imgs), 1, img_size, img_size)
    # PIL resamples in 8-bit and with its own filter taps: a few grey levels apart at most
    assert (ours - ref).abs().mean() < 0.02 / 0.353
    assert (ours - ref).abs().max() < 0.1 / 0.353


def test_training_without_crop_or_flip_is_the_eval_resize():
    cfg = _cfg()
    imgs = _images()
    train = batch_aug.BatchAugment(cfg, *norm_stats(cfg, 1), 1, is_training=True)(imgs)
    evl = batch_aug.BatchAugment(cfg, *norm_stats(cfg, 1), 1, is_training=False)(imgs)
    torch.testing.assert_close(train, evl)


def test_flip_probability_one_mirrors_every_image():
    cfg = _cfg(img_size=28, hflip=1.0)
    imgs = _images()
    aug = batch_aug.BatchAugment(cfg, (0.0,), (1.0,), 1, is_training=True)
    torch.testing.assert_close(aug(imgs), imgs.flip(-1).unsqueeze(1).float() / 255)


def test_three_channels_replicate_the_grey_image():
    cfg = _cfg()
    out = batch_aug.BatchAugment(cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3, is_training=False)(_images())
    assert out.shape[1] == 3 and torch.equal(out[:, 0], out[:, 2])


def test_crop_params_follow_scale_and_ratio():
    cfg = _cfg(scale=[0.25, 0.5], ratio=[0.75, 1.3333])
    aug = batch_aug.BatchAugment(cfg, (0.0,), (1.0,), 1, is_training=True)
    torch.manual_seed(0)
    p = aug.crop_params(4000, 28, 28)
    top, left, h, w = p.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).float() / 784
    assert area.min() > 0.2 and area.max() < 0.56  # the drawn range, widened by rounding to pixels
    assert (w.float() / h).min() > 0.6 and (w.float() / h).max() < 1.6
    assert len({(int(a), int(b)) for a, b in zip(top, left)}) > 50  # positions vary
    out = aug(_images(8))
    assert out.shape == (8, 1, 20, 20) and torch.isfinite(out).all()


def test_unsupported_options_keep_the_per_sample_pipeline():
    assert batch_aug.supports(_cfg())
    for kw in (dict(aa="rand-m9-mstd0.5"), dict(color_jitter=0.4), dict(reprob=0.25), dict(interpolation="nearest")):
        assert not batch_aug.supports(_cfg(**kw)), kw
    with pytest.raises(ValueError, match="does not implement"):
        batch_aug.BatchAugment(_cfg(reprob=0.25), (0.0,), (1.0,), 1, is_training=True)


def test_dataset_getitems_batches_through_the_transform(monkeypatch):
    ds = FashionMNIST.__new__(FashionMNIST)
    ds.images, ds.targets = _images(10).numpy(), np.arange(10, dtype=np.int64)
    calls = []

    def transform(x):
        calls.append(x.shape)
        return x.unsqueeze(1).float()

    ds.transform, ds.mode, ds.batch_transform = None, "L", transform
    items = ds.__getitems__([3, 1, 7])
    assert calls == [torch.Size([3, 28, 28])]  # one call for the whole batch
    assert [t for _, t in items] == [3, 1, 7]
    assert torch.equal(items[1][0], torch.from_numpy(ds.images[1]).unsqueeze(0).float())
    assert ds[5][1] == 5
