"""Exported models as a source for ``shufflemamba eval``: a folder written by ``shufflemamba export``,
``local-dir:PATH`` or ``hf-hub:USER/NAME``, loaded by timm itself, evaluated with the preprocessing its
``pretrained_cfg`` records (input size, mean / std, crop_pct, interpolation) on the data the user names.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import UserError
from .training.config import DEFAULTS, validate_config  # the run config (for the data pipeline)

__all__ = ["is_exported", "timm_name", "load_exported", "evaluate_exported"]

SOURCES = ("hf-hub:", "local-dir:")


def is_exported(source: str) -> bool:
    """A timm source name, or a folder holding an export's ``config.json`` (a run folder has none)."""
    return source.startswith(SOURCES) or os.path.isfile(os.path.join(source, "config.json"))


def timm_name(source: str) -> str:
    """The name ``timm.create_model`` takes: a plain folder becomes ``local-dir:FOLDER``."""
    return source if source.startswith(SOURCES) else f"local-dir:{source}"


def load_exported(source: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(source, pretrained=True, **kwargs)`` in eval mode.

    Raises:
        UserError: a folder without or with a broken ``config.json``, an architecture timm does not
            know, weights missing, corrupted or not fitting, or a Hub repo that cannot be fetched.
    """
    import timm

    name = timm_name(source)
    if name.startswith("local-dir:") and not os.path.isdir(name.partition(":")[2]):
        raise UserError(f"'{name.partition(':')[2]}' is not a folder")
    try:
        return timm.create_model(name, pretrained=True, **kwargs).eval()
    except Exception as err:  # noqa: BLE001 - json, safetensors, state-dict and Hub errors alike: one line
        why = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UserError(f"could not load the exported model '{source}' ({type(err).__name__}: {why})") from None


def evaluate_exported(source: str, overrides: dict[str, Any], use_ema: bool = False) -> dict[str, Any]:
    """Evaluate an exported model on the val split of the data ``overrides`` names (``data_dir`` /
    ``dataset`` are required: an export does not say where its data lies). Returns
    :func:`~shufflemamba.engine.evaluate`'s metrics."""
    from .training.data import build_loaders
    from .training.engine import evaluate

    overrides = dict(overrides)
    if use_ema:
        raise UserError("an exported model holds one set of weights (`shufflemamba export --ema` chooses them); drop --ema")
    if overrides.pop("model", None) is not None:
        raise UserError("--model does not apply to an exported model (its config.json names the architecture)")
    if overrides.get("data_dir") is None and overrides.get("dataset") is None:
        raise UserError("evaluating an exported model needs its data: pass --data-dir DIR or --dataset NAME")
    model = load_exported(source, **(overrides.pop("model_kwargs", None) or {}))
    pre = model.pretrained_cfg
    in_chans, height, width = pre["input_size"]
    if height != width:
        raise UserError(f"'{source}' expects {height} x {width} inputs; evaluation here takes square images only")
    cfg = {**DEFAULTS, "model": pre.get("architecture") or "exported", "img_size": int(height),
           "mean": list(pre["mean"]), "std": list(pre["std"]), "crop_pct": pre["crop_pct"],
           "interpolation": pre["interpolation"]}
    if overrides.get("data_dir") is not None and overrides.get("dataset") is None:
        cfg["dataset"] = None  # a data dir alone means the ImageFolder layout
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["batch_size"] = cfg["batch_size"] or 128
    cfg = validate_config(cfg)
    loaders = build_loaders(cfg, int(in_chans), train=False)
    labels = pre.get("label_names")
    if loaders["num_classes"] != model.num_classes:
        raise UserError(f"'{source}' has {model.num_classes} classes but the data has {loaders['num_classes']}")
    data_classes = list(loaders.get("classes") or [])
    if labels and data_classes and list(labels) != data_classes:
        raise UserError(f"'{source}' was trained on classes {list(labels)[:5]}..., the data has {data_classes[:5]}...")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    model.to(device)
    metrics = evaluate(model, loaders["val_loader"], device, cfg["amp"], cfg["amp_dtype"])
    metrics["source"] = f"{source} ({pre.get('architecture')}, exported) on the val split of {cfg['dataset'] or cfg['data_dir']}"
    return metrics
