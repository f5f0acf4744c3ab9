"""A segmentation run as a folder to share, and back.

timm's ``create_model`` builds classifiers by name; a segmentor (backbone + pyramid + UperNet + FCN
heads) is rebuilt from its run's configuration instead, so its folder holds ``config.json`` (``task:
segmentation``, the run's configuration, class names), ``model.safetensors`` (every weight of the
segmentor), a ``README.md`` card and the run's ``curves.png``. :func:`load_seg_export` reads it into
the same dict a segmentation checkpoint is, so ``shufflemamba eval`` and ``predict`` take either.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import UserError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def is_seg_export(path: str | None) -> bool:
    """Whether ``path`` is a folder written by :func:`shufflemamba.export.export_run` for a segmentation run."""
    if not path or not os.path.isfile(os.path.join(path, CONFIG)):
        return False
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            return json.load(f).get("task") == "segmentation"
    except (OSError, ValueError, AttributeError):
        return False


def export_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a segmentation checkpoint."""
    return {"task": "segmentation", "architecture": ckpt["model_name"], "num_classes": int(ckpt["num_classes"]),
            "label_names": list(ckpt.get("classes") or []), "config": dict(ckpt["config"], init_from=None, pretrained=False)}


def load_seg_export(folder: str) -> dict[str, Any]:
    """The export in ``folder`` as a segmentation checkpoint dict (task, model_name, config, classes,
    num_classes, model). Raises UserError for a broken or foreign folder."""
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, CONFIG), encoding="utf-8") as f:
            meta = json.load(f)
        state = load_file(os.path.join(folder, WEIGHTS))
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the exported segmentation model in '{folder}' ({type(err).__name__})") from None
    if meta.get("task") != "segmentation" or not isinstance(meta.get("config"), dict):
        raise UserError(f"'{folder}' is not an exported segmentation model (its config.json names no segmentation task)")
    return {"task": "segmentation", "model_name": meta.get("architecture"), "config": meta["config"],
            "num_classes": int(meta["num_classes"]), "classes": list(meta.get("label_names") or []), "model": state}


def model_card(ckpt: dict[str, Any], name: str, has_curves: bool) -> str:
    """A short card from the run: model, data, recipe and its best and final scores."""
    cfg, history = ckpt["config"], list((ckpt.get("state") or {}).get("history") or ckpt.get("history") or [])
    lines = [f"# {name}", "", f"Semantic segmentation: UperNet on `{ckpt['model_name']}`, trained with "
             "[shufflemamba](https://arxiv.org/abs/2408.17081) (`shufflemamba train --task segmentation`).", "",
             f"- classes ({ckpt['num_classes']}): {', '.join(map(str, ckpt.get('classes') or [])) or 'unnamed'}",
             f"- data: {cfg.get('data_dir')} ({cfg.get('layout')} layout); crop {cfg.get('crop_size')}, "
             f"{cfg.get('iters')} iterations of batch {cfg.get('batch_size')}, AdamW lr {cfg.get('lr')}"]
    if history:
        best = max(history, key=lambda r: r.get("mIoU", -1))
        last = history[-1]
        lines.append(f"- mIoU {last.get('mIoU', float('nan')):.2f} at iteration {last.get('iter')} "
                     f"(best {best.get('mIoU', float('nan')):.2f} at {best.get('iter')}); mAcc {last.get('mAcc', float('nan')):.2f}, "
                     f"aAcc {last.get('aAcc', float('nan')):.2f}")
    lines += ["", "Load it with shufflemamba (timm builds classifiers only):", "", "```bash",
              f"shufflemamba eval --checkpoint {name} --data-dir DIR", f"shufflemamba predict --checkpoint {name} image.jpg",
              "```"]
    if has_curves:
        lines += ["", "![training curves](curves.png)"]
    return "\n".join(lines) + "\n"
