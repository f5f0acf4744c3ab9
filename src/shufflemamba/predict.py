"""``shufflemamba predict --checkpoint RUN IMAGE...``: what a trained run says about new images.

A segmentation run writes, per image, ``<stem>.png`` (the predicted mask in the run's colours) and
``<stem>_labels.png`` (the class indices, one channel) under ``--output`` (default ``RUN/predict``),
inferred as the run evaluates (resize to its ``scale``, sliding windows, back to the image's size).
A classification run prints the top-5 classes of each image with their probabilities.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import UserError


def add_predict_parser(sub: Any, parser_class: type) -> None:
    p = sub.add_parser("predict", help="predict masks (segmentation run) or top-5 classes (classification run)")
    p.add_argument("--checkpoint", required=True, help="run folder (its newest checkpoint) or checkpoint file")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--output", help="segmentation: folder for the masks (default: RUN/predict)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--trust-checkpoint", action="store_true", help="load checkpoints that need Python's unpickler")


def _open(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image '{path}': {err}") from None


def _device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return torch.device("cuda" if torch.cuda.is_available() and name != "cpu" else "cpu")


def predict_segmentation(ckpt: dict[str, Any], run: str, images: list[str], output: str | None, device: torch.device) -> list[str]:
    from .segmentation.config import validate_seg_config
    from .segmentation.data import normalise, rescale_size
    from .segmentation.figures import colour_mask
    from .segmentation.inference import predict_logits
    from .segmentation.model import build_segmentor

    cfg = validate_seg_config({**ckpt["config"], "init_from": None, "pretrained": False})
    model = build_segmentor(cfg, ckpt["num_classes"], log=lambda m: None)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    out_dir = output or os.path.join(run if os.path.isdir(run) else os.path.dirname(run) or ".", "predict")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in images:
        image = _open(path)
        w, h = rescale_size(image.width, image.height, tuple(cfg["scale"]))
        x = normalise(np.asarray(image.resize((w, h), Image.BILINEAR)), cfg["mean"], cfg["std"]).unsqueeze(0).to(device)
        logits = predict_logits(model, x, ckpt["num_classes"], mode=cfg["test_mode"], crop=cfg["test_crop"],
                                stride=cfg["test_stride"], out_size=(image.height, image.width))
        labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(colour_mask(labels, ckpt["num_classes"], cfg["ignore_index"])).save(os.path.join(out_dir, stem + ".png"))
        Image.fromarray(labels, mode="L").save(os.path.join(out_dir, stem + "_labels.png"))
        present = ", ".join(ckpt["classes"][c] for c in np.unique(labels) if c < len(ckpt["classes"]))
        print(f"{path}: {os.path.join(out_dir, stem + '.png')} ({present})")
        written.append(os.path.join(out_dir, stem + ".png"))
    return written


def predict_classification(ckpt: dict[str, Any], images: list[str], device: torch.device) -> list[list[tuple[str, float]]]:
    from .training.config import DEFAULTS
    from .training.data import build_transform
    from .training.model_setup import build_model, load_weights, model_in_chans

    cfg = {**DEFAULTS, **(ckpt.get("config") or {})}
    kwargs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "pretrained"}
    if ckpt.get("model_name") is None:
        raise UserError("the checkpoint does not name its model (official weights): evaluate it with `shufflemamba eval --model`")
    model = build_model(ckpt["model_name"], kwargs)
    load_weights(model, ckpt["model"], ckpt["model_name"], "checkpoint")
    model.to(device).eval()
    in_chans = model_in_chans(kwargs)
    transform = build_transform(cfg, in_chans, is_training=False)
    classes = ckpt.get("classes") or [str(i) for i in range(model.num_classes)]
    return _top5(model, transform, classes, in_chans, images, device)


def predict_exported(source: str, images: list[str], device: torch.device) -> list[list[tuple[str, float]]]:
    """Top-5 classes from an exported folder, ``local-dir:`` or ``hf-hub:`` name: the preprocessing
    is the export's own (its pretrained_cfg), as timm would run it."""
    import timm

    from .hub import load_exported

    model = load_exported(source).to(device).eval()
    data_cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    classes = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    return _top5(model, transform, classes, data_cfg["input_size"][0], images, device)


def _top5(model: torch.nn.Module, transform: Any, classes: list[str], in_chans: int, images: list[str],
          device: torch.device) -> list[list[tuple[str, float]]]:
    results = []
    for path in images:
        image = _open(path)
        if in_chans == 1:
            image = image.convert("L")
        with torch.no_grad():
            probs = model(transform(image).unsqueeze(0).to(device)).softmax(-1)[0].cpu()
        top = probs.topk(min(5, probs.numel()))
        pairs = [(classes[i], float(p) * 100) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        print(f"{path}: " + ", ".join(f"{c} {p:.1f}%" for c, p in pairs))
        results.append(pairs)
    return results


def cmd_predict(args: argparse.Namespace) -> int:
    from .training.checkpointing import TRUST_ENV, latest_checkpoint, load_training_checkpoint

    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = "1"
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise UserError(f"image '{missing[0]}' not found")
    from .hub import is_exported
    from .segmentation.export import is_seg_export, load_seg_export

    if is_seg_export(args.checkpoint):
        predict_segmentation(load_seg_export(args.checkpoint), args.checkpoint, args.images, args.output,
                             _device(args.device))
        return 0
    if is_exported(args.checkpoint):  # `shufflemamba export`'s folders, local-dir: / hf-hub: names
        if args.output:
            raise UserError("--output is for segmentation runs; a classifier prints its top-5 classes")
        predict_exported(args.checkpoint, args.images, _device(args.device))
        return 0
    path = latest_checkpoint(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
    ckpt = load_training_checkpoint(path)
    device = _device(args.device)
    if ckpt.get("task") == "segmentation":
        predict_segmentation(ckpt, args.checkpoint, args.images, args.output, device)
    else:
        if args.output:
            raise UserError("--output is for segmentation runs; a classification run prints its top-5 classes")
        predict_classification(ckpt, args.images, device)
    return 0
