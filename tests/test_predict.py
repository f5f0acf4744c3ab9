"""``shufflemamba predict``: coloured masks for a segmentation run, top-5 classes for a classification run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import shufflemamba  # noqa: F401
from shufflemamba.cli import main
from shufflemamba.segmentation.config import resolve_seg_config
from shufflemamba.segmentation.data import normalise
from shufflemamba.segmentation.inference import predict_logits
from shufflemamba.segmentation.model import build_segmentor


@pytest.fixture
def image(tmp_path) -> str:
    path = str(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_segmentation_run_writes_masks_matching_the_model(tmp_path, image, capsys):
    cfg = resolve_seg_config(None, {"model": "vim_tiny_patch16_224", "model_kwargs": {"embed_dim": 32, "depth": 4},
                                    "out_indices": [0, 1, 2, 3], "head_channels": 16, "aux_channels": 8, "crop_size": 32,
                                    "scale": [56, 40], "test_crop": 32, "test_stride": 21, "num_classes": 3})
    torch.manual_seed(0)
    model = build_segmentor(cfg, 3, log=lambda m: None).eval()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"task": "segmentation", "config": cfg, "num_classes": 3, "classes": ["a", "b", "c"],
                "model": model.state_dict(), "model_name": cfg["model"]}, run / "last.pt")
    assert main(["predict", "--checkpoint", str(run), image]) == 0
    assert "photo.png" in capsys.readouterr().out
    labels = np.asarray(Image.open(run / "predict" / "photo_labels.png"))
    coloured = np.asarray(Image.open(run / "predict" / "photo.png"))
    assert labels.shape == (40, 56) and coloured.shape == (40, 56, 3)
    x = normalise(np.asarray(Image.open(image).convert("RGB")), cfg["mean"], cfg["std"]).unsqueeze(0)
    want = predict_logits(model, x, 3, mode="slide", crop=32, stride=21).argmax(1)[0].numpy()
    assert np.array_equal(labels, want)


def test_classification_run_prints_top5(tmp_path, image, capsys):
    kw = {"patch_size": 4, "embed_dim": 16, "depth": 1, "d_state": 4, "img_size": 16, "num_classes": 6}
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", **kw).eval()
    classes = [f"k{i}" for i in range(6)]
    path = str(tmp_path / "c.pt")
    torch.save({"model": model.state_dict(), "model_name": "vim_tiny_patch16_224", "model_kwargs": kw,
                "classes": classes, "config": {"img_size": 16}}, path)
    assert main(["predict", "--checkpoint", path, image]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(image + ": ") and line.count("%") == 5
    from shufflemamba.training.config import DEFAULTS
    from shufflemamba.training.data import build_transform

    x = build_transform({**DEFAULTS, "img_size": 16}, 3, is_training=False)(Image.open(image).convert("RGB"))
    top1 = classes[int(model(x.unsqueeze(0)).argmax())]
    assert line.split(": ", 1)[1].startswith(top1 + " ")


def test_missing_image_is_one_error_line(tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path), str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.png" in err[0]
    assert not os.path.exists(tmp_path / "predict")


def test_exported_folder_predicts_as_its_run(tmp_path, image, capsys):
    """`predict` on a `shufflemamba export` folder prints the same top-5 as on the checkpoint it came from."""
    kw = {"patch_size": 4, "embed_dim": 16, "depth": 1, "d_state": 4, "img_size": 16, "num_classes": 6}
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", **kw).eval()
    path = str(tmp_path / "c.pt")
    torch.save({"model": model.state_dict(), "model_name": "vim_tiny_patch16_224", "model_kwargs": kw,
                "classes": [f"k{i}" for i in range(6)], "config": {"img_size": 16, "crop_pct": 1.0}}, path)
    assert main(["export", path, str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", path, image]) == 0
    from_run = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["predict", "--checkpoint", str(tmp_path / "exp"), image]) == 0
    from_export = capsys.readouterr().out.strip().splitlines()[-1]
    assert from_export == from_run and from_run.count("%") == 5
