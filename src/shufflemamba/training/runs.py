"""From a run folder (or one of its checkpoints) back to a model in Python: :func:`load_model`."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch.nn as nn

from .checkpointing import load_training_checkpoint
from ..errors import UserError
from .data import norm_stats
from .model_setup import build_model, load_weights


def _checkpoint_path(run_or_checkpoint: str, which: Literal["best", "last"]) -> str:
    if not os.path.isdir(run_or_checkpoint):
        return run_or_checkpoint
    for name in (f"{which}.pt", "last.pt"):
        path = os.path.join(run_or_checkpoint, name)
        if os.path.isfile(path):
            return path
    raise UserError(f"run folder '{run_or_checkpoint}' has no {which}.pt or last.pt (no epoch finished yet?)")


def _pretrained_cfg(ckpt: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The model's pretrained_cfg with what the run trained on: class names and its eval transform, so
    ``timm.data.resolve_data_config(model=model)`` preprocesses images as the run's evaluation did."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    run = ckpt.get("config") or {}
    kwargs = ckpt.get("model_kwargs") or {}
    in_chans, size = int(kwargs.get("in_chans", 3)), run.get("img_size") or kwargs.get("img_size")
    if size:
        cfg["input_size"] = (in_chans, int(size), int(size))
    if run:
        mean, std = norm_stats(run, in_chans)
        cfg.update(mean=tuple(mean), std=tuple(std), crop_pct=run.get("crop_pct", cfg.get("crop_pct")),
                   interpolation=run.get("interpolation", cfg.get("interpolation")))
    if ckpt.get("classes"):
        cfg["label_names"] = list(ckpt["classes"])
    cfg["num_classes"] = int(kwargs.get("num_classes", cfg.get("num_classes", 0)) or 0)
    return cfg


def load_model(run_or_checkpoint: str, *, which: Literal["best", "last"] = "best", ema: bool = False,
               trust: bool = False) -> nn.Module:
    """The trained model of a run, in eval mode on the CPU.

    Args:
        run_or_checkpoint: a run folder (its ``best.pt``, else ``last.pt``) or a checkpoint file.
        which: ``"best"`` or ``"last"`` epoch, for a run folder.
        ema: the EMA weights (runs trained with ``--model-ema``).
        trust: allow files that need Python's unpickler (only files you trust).

    Returns:
        The model, built by timm from the name and keyword arguments the checkpoint stores, with
        ``model.classes`` (the class names, in output order) and ``model.pretrained_cfg`` carrying the
        run's input size, mean / std, crop and interpolation.

    Raises:
        UserError: missing files, a checkpoint that names no model, or one without EMA weights.
    """
    path = _checkpoint_path(run_or_checkpoint, which)
    ckpt = load_training_checkpoint(path, trust=trust)
    name = ckpt.get("model_name")
    if name is None:
        raise UserError(f"checkpoint '{path}' does not name its model: build it with timm.create_model and "
                        "load it with shufflemamba.load_checkpoint")
    state = ckpt["model"]
    if ema:
        if ckpt.get("model_ema") is None:
            raise UserError(f"checkpoint '{path}' has no EMA weights (trained without --model-ema)")
        state = ckpt["model_ema"]
    model = build_model(name, {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "pretrained"})
    load_weights(model, state, name, path)
    model.pretrained_cfg = _pretrained_cfg(ckpt, model)
    model.classes = list(ckpt.get("classes") or [])
    return model.eval()
