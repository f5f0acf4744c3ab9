"""A model for a run: built by name through timm's registry (one error line for a bad name or keyword),
its keyword arguments from the config, and weights loaded from a checkpoint. Kept apart from the
training loop so that loading a run's model does not import it."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..errors import UserError
from .checkpointing import load_training_checkpoint


def is_our_model(name: str) -> bool:
    """True when ``name`` is registered by shufflemamba (and so takes SLWS keyword arguments)."""
    from timm.models import is_model, model_entrypoint

    return is_model(name) and model_entrypoint(name).__module__.startswith("shufflemamba")


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with user errors for unknown names and bad kwargs."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise UserError(f"model '{name}' rejected its keyword arguments {sorted(kwargs)}: {err}") from None
    except (ValueError, AssertionError) as err:
        raise UserError(f"model '{name}' could not be built with {kwargs}: {err}") from None


def model_kwargs_for(cfg: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Keyword arguments for the model: the config's model_kwargs plus data-derived values, drop path
    and, for our Vim models, the SLWS rate and schedule."""
    kw = dict(cfg["model_kwargs"])
    kw.setdefault("num_classes", num_classes)
    kw.setdefault("img_size", cfg["img_size"])
    if cfg["drop_path"] is not None:
        kw.setdefault("drop_path_rate", cfg["drop_path"])
    ours = is_our_model(cfg["model"])
    for key in ("slws_rate", "slws_schedule"):
        if cfg[key] is None:
            continue  # the model's own default (ShuffleMamba models: 0.5, Vim models: 0)
        if not ours:
            raise UserError(f"--{key.replace('_', '-')} needs a ShuffleMamba/Vim model; '{cfg['model']}' does not support SLWS")
        kw.setdefault(key, cfg[key])
    return kw


def model_in_chans(kwargs: dict[str, Any]) -> int:
    return int(kwargs.get("in_chans", 3))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: str) -> None:
    """Strict load; a mismatch becomes one line naming the architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"checkpoint '{path}' does not match model '{name}': {first[:200]}") from None


def init_weights(model: nn.Module, path: str, name: str, log: Callable[[str], None] = print) -> None:
    """Start from another run's weights (later Reg stages, fine-tuning): pos_embed is resized to the
    new resolution; a head, registers or neck of another class count / register layout are left
    freshly initialised and named in one ``log`` line (``models.checkpoint.init_from_checkpoint``)."""
    ckpt = load_training_checkpoint(path)
    if is_our_model(name):
        from ..models.checkpoint import init_from_checkpoint

        try:
            init_from_checkpoint(model, ckpt, key="model", log=log, source=path)
        except ValueError as err:
            raise UserError(f"--init-from '{path}' does not fit model '{name}': {err}") from None
    else:
        load_weights(model, ckpt["model"], name, path)
