"""Loading Vim / ShuffleMamba checkpoints, with position-embedding resizing for both class-token positions.

Official Vim checkpoints are dicts with the state dict under ``"model"`` (beside ``"model_ema"``, the
optimizer state and the training arguments as a pickled ``argparse.Namespace``); training checkpoints of
this project use ``"model"`` too. The position embedding is ``(1, M + 1, D)`` with the class token at
index ``M // 2`` ("middle", Vim) or ``0`` ("head", ShuffleMamba). To fine-tune at another resolution the
class-token row must be taken out at the OLD index, the patch rows resized as a 2D grid, and the
class-token row put back at the NEW index (the official code reuses the old index).

Fine-tuning to another class count or register layout (:func:`init_from_checkpoint`) drops the entries
the new task re-learns when their shapes differ, as ShuffleMamba's ``main_shuffle.py`` does:
``head.*``, ``cls_token`` (the registers of the Reg models), ``pos_embed_cls``, ``neck.*`` and
``norm_neck.*``; one log line names them.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["resize_pos_embed", "prepare_state_dict", "load_checkpoint", "init_from_checkpoint",
           "read_checkpoint", "CHECKPOINT_KEYS", "FINETUNE_KEYS"]

_logger = logging.getLogger(__name__)

# where a state dict may sit inside a checkpoint dict, in order of preference
CHECKPOINT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")

# entries a fine-tune re-learns when the new model's shapes differ or it has no such entry (a trailing
# "." names a module prefix): the classifier, and for the register models the registers, their
# position embedding and the head's neck (the list main_shuffle.py uses)
FINETUNE_KEYS = ("head.", "cls_token", "pos_embed_cls", "neck.", "norm_neck.")


def _grid(grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return (grid, grid)
    h, w = (int(g) for g in grid)
    return (h, w)


def cls_token_index(num_patches: int, cls_position: str | None) -> int | None:
    """Sequence index of the class token among ``num_patches + 1`` tokens (None: no class token)."""
    if cls_position is None:
        return None
    if cls_position == "middle":
        return num_patches // 2
    if cls_position == "head":
        return 0
    raise ValueError(f"cls_position must be 'middle' or 'head', got {cls_position!r}")


def resize_pos_embed(
    pos_embed: Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    cls_position: str | None = "middle",
) -> Tensor:
    """Resize a Vim position embedding to another patch grid (bicubic), keeping the class-token row.

    Args:
        pos_embed: (1, M_old + 1, D), or (1, M_old, D) when ``cls_position`` is None.
        new_grid: target patch grid (h, w) (or one int for a square grid).
        old_grid: source grid; ``None`` infers a square grid from M_old.
        cls_position: ``"middle"`` (class token at index M // 2), ``"head"`` (index 0), or None: no
            class-token row (the register models, whose registers have their own ``pos_embed_cls``).

    Returns:
        (1, M_new + 1, D) with the class-token row at its index for the new grid ((1, M_new, D) without).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be shaped (1, M + 1, D), got {tuple(pos_embed.shape)}")
    n_cls = 0 if cls_position is None else 1
    m_old = pos_embed.shape[1] - n_cls
    if old_grid is None:
        side = math.isqrt(m_old)
        if side * side != m_old:
            raise ValueError(f"cannot infer a square grid from {m_old} patch positions; pass old_grid")
        old_grid = (side, side)
    old_grid, new_grid = _grid(old_grid), _grid(new_grid)
    if old_grid[0] * old_grid[1] != m_old:
        raise ValueError(f"old_grid {old_grid} does not match pos_embed with {m_old} patch positions")
    i_old = cls_token_index(m_old, cls_position)
    m_new = new_grid[0] * new_grid[1]
    i_new = cls_token_index(m_new, cls_position)
    if i_old is None:
        cls, patches = pos_embed[:, :0], pos_embed  # (1, 0, D), (1, M_old, D)
        i_old = i_new = 0
    else:
        cls = pos_embed[:, i_old : i_old + 1]  # (1, 1, D)
        patches = torch.cat((pos_embed[:, :i_old], pos_embed[:, i_old + 1 :]), dim=1)  # (1, M_old, D)
    if new_grid != old_grid:
        dim = patches.shape[-1]
        grid = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()  # (1, D, h, w)
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, m_new, dim).to(pos_embed.dtype)  # (1, M_new, D)
    return torch.cat((patches[:, :i_new], cls, patches[:, i_new:]), dim=1)


def _unwrap(checkpoint: Mapping[str, Any], key: str | None) -> dict[str, Tensor]:
    if key is not None:
        if key not in checkpoint:
            raise KeyError(f"checkpoint has no entry {key!r}; it has {sorted(checkpoint)[:10]}")
        return dict(checkpoint[key])
    for k in CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(k), Mapping):
            return dict(checkpoint[k])
    return dict(checkpoint)


def prepare_state_dict(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    *,
    key: str | None = None,
    old_grid: int | tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """Unwrap a checkpoint, strip a DDP ``module.`` prefix, resize pos_embed, adapt the patch conv to in_chans.

    Args:
        checkpoint: a state dict, or a dict holding one under one of :data:`CHECKPOINT_KEYS`.
        model: the target :class:`~shufflemamba.models.VisionMamba` (its grid and class-token position).
        key: take the state dict from this entry instead of searching :data:`CHECKPOINT_KEYS`.
        old_grid: the checkpoint's patch grid when it is not square.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    state = _unwrap(checkpoint, key)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    pe = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if isinstance(pe, Tensor) and isinstance(target, Tensor) and pe.shape != target.shape:
        if pe.dim() != 3 or pe.shape[-1] != target.shape[-1]:
            raise ValueError(f"pos_embed shape {tuple(pe.shape)} is incompatible with the model's "
                             f"{tuple(target.shape)} (different embed_dim?)")
        # register models have no class-token row in pos_embed (their registers use pos_embed_cls)
        cls_position = None if getattr(model, "num_registers", 0) else getattr(model, "cls_position", "middle")
        state["pos_embed"] = resize_pos_embed(pe, model.patch_embed.grid_size, old_grid, cls_position)
    w = state.get("patch_embed.proj.weight")
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(w, Tensor) and isinstance(proj, nn.Conv2d) and w.dim() == 4 and w.shape[1] != proj.in_channels:
        from timm.models import adapt_input_conv  # RGB weights for a grey (or other) input, as timm does

        state["patch_embed.proj.weight"] = adapt_input_conv(proj.in_channels, w)
    return state


def read_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> Any:
    """``torch.load`` a checkpoint on the CPU.

    With ``weights_only`` (the default) only tensors, containers and ``argparse.Namespace`` are
    unpickled: the official Vim and Mamba-Reg files keep their training arguments as a Namespace beside
    the weights, and a Namespace holds plain values, so allowing it keeps the load safe (timm does the
    same). Anything else needs ``weights_only=False``, for files you trust.

    Raises:
        ValueError: the file holds other pickled objects and ``weights_only`` is set (the message
            names the opt-in).
    """
    try:
        if weights_only:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=False)
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        raise ValueError(f"{os.fspath(path)} holds pickled objects other than tensors and argparse.Namespace; "
                         "if you trust the file, load it with weights_only=False (e.g. "
                         "shufflemamba.models.load_checkpoint(model, path, weights_only=False))") from e


def _is_finetune_key(key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in FINETUNE_KEYS)


def _shape(t: Any) -> str:
    return "x".join(str(d) for d in t.shape) if isinstance(t, Tensor) else "?"


def drop_for_finetune(state: dict[str, Tensor], model: nn.Module) -> tuple[list[str], list[str]]:
    """Remove from ``state`` (in place) the :data:`FINETUNE_KEYS` entries that do not fit ``model``.

    An entry is dropped when the model has no such key or its shape differs; entries that fit are kept
    (a head with the same class count is loaded, as the reference does).

    Returns:
        (the descriptions of the dropped entries, e.g. ``"head.weight 1000x192 -> 10x192"``, and the
        model's fine-tune entries the checkpoint does not have, which keep their fresh initialisation).
    """
    own = model.state_dict()
    dropped = []
    for k in [k for k in state if _is_finetune_key(k)]:
        if k not in own:
            dropped.append(f"{k} {_shape(state[k])} (not in the model)")
        elif tuple(state[k].shape) != tuple(own[k].shape):
            dropped.append(f"{k} {_shape(state[k])} -> {_shape(own[k])}")
        else:
            continue
        del state[k]
    fresh = sorted(k for k in own if _is_finetune_key(k) and k not in state)
    return dropped, fresh


def finetune_message(dropped: list[str], fresh: list[str], source: str = "checkpoint") -> str:
    """The one line that says what a fine-tune load left out (empty when nothing was)."""
    if not dropped and not fresh:
        return ""
    parts = []
    if dropped:
        parts.append("dropped " + ", ".join(dropped))
    new = [k for k in fresh if not any(d.startswith(k + " ") for d in dropped)]
    if new:
        parts.append("new in the model: " + ", ".join(new))
    return f"fine-tuning from {source}: {'; '.join(parts)} (these start from the model's initialisation)"


def load_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    *,
    key: str | None = None,
    skip_mismatched_head: bool = False,
    finetune: bool = False,
    log: Callable[[str], None] | None = None,
    old_grid: int | tuple[int, int] | None = None,
    weights_only: bool = True,
) -> Any:
    """Load a Vim / ShuffleMamba checkpoint into ``model``, resizing pos_embed to the model's grid.

    Args:
        model: the model to load into.
        path_or_state: a file path, a state dict, or a checkpoint dict (``{"model": ...}`` etc.).
        strict: every key must match (as ``load_state_dict``).
        key: entry of the checkpoint dict to load (e.g. ``"model_ema"``); default: the first of
            :data:`CHECKPOINT_KEYS` present, else the dict itself.
        skip_mismatched_head: drop ``head.*`` entries whose shapes differ (new classes), silently.
        finetune: drop every :data:`FINETUNE_KEYS` entry that does not fit the model (another class
            count or register layout) and report them in one line through ``log``; the rest must
            still match (with ``strict``).
        log: where the ``finetune`` line goes (default: this module's logger at INFO).
        old_grid: the checkpoint's patch grid when it is not square.
        weights_only: passed to ``torch.load`` (see :func:`read_checkpoint`); the official files load
            with the default.

    Returns:
        ``load_state_dict``'s result (missing and unexpected keys).

    Raises:
        ValueError: shapes or (with ``strict``) key sets differ, naming the first offending keys.
    """
    checkpoint, source = _read(path_or_state, weights_only)
    return _load(model, checkpoint, source, strict=strict, key=key, skip_mismatched_head=skip_mismatched_head,
                 finetune=finetune, log=log, old_grid=old_grid)


def _read(path_or_state: str | os.PathLike | Mapping[str, Any], weights_only: bool) -> tuple[Any, str]:
    if isinstance(path_or_state, (str, os.PathLike)):
        return read_checkpoint(path_or_state, weights_only=weights_only), os.fspath(path_or_state)
    return path_or_state, "checkpoint"


def _load(model: nn.Module, checkpoint: Any, source: str, *, strict: bool, key: str | None,
          skip_mismatched_head: bool, finetune: bool, log: Callable[[str], None] | None,
          old_grid: int | tuple[int, int] | None) -> Any:
    state = prepare_state_dict(checkpoint, model, key=key, old_grid=old_grid)
    own = model.state_dict()
    allowed_missing: set[str] = set()
    if finetune:
        dropped, fresh = drop_for_finetune(state, model)
        allowed_missing = set(fresh)
        line = finetune_message(dropped, fresh, source)
        if line:
            (log or _logger.info)(line)
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if skip_mismatched_head:
        for k in [k for k in mismatched if k.startswith("head.")]:
            del state[k]
            allowed_missing.add(k)
        mismatched = [k for k in mismatched if not k.startswith("head.")]
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in mismatched[:4])
        raise ValueError(f"checkpoint does not match the model architecture ({len(mismatched)} shape "
                         f"mismatch(es)): {detail}")
    if strict:
        missing = sorted(set(own) - set(state) - allowed_missing)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint keys do not match the model: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        strict = not allowed_missing
    return model.load_state_dict(state, strict=strict)


def init_from_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    key: str | None = "model",
    log: Callable[[str], None] | None = None,
    source: str | None = None,
    weights_only: bool = True,
) -> Any:
    """Start a fine-tune (or a later training stage) from another run's weights.

    The backbone must match; pos_embed is resized to the model's grid (another resolution or patch
    stride); ``head.*``, ``cls_token``, ``pos_embed_cls``, ``neck.*``, ``norm_neck.*`` are dropped
    when their shapes differ (another class count or register layout) and named in one ``log`` line.

    Args:
        model: the freshly built model.
        path_or_state: a file path, or an already loaded checkpoint dict / state dict.
        key: the checkpoint entry holding the weights (``"model"``, as official and our checkpoints;
            ``None``: the first of :data:`CHECKPOINT_KEYS`, else the dict itself).
        log: where the line naming the dropped entries goes (default: this module's logger).
        source: what the line calls the checkpoint (default: its path, or "checkpoint").
        weights_only: see :func:`read_checkpoint`.

    Returns:
        ``load_state_dict``'s result.

    Raises:
        ValueError: the backbone does not match (names the first offending keys).
    """
    checkpoint, read_from = _read(path_or_state, weights_only)
    source = source or read_from
    if key is not None and isinstance(checkpoint, Mapping) and key not in checkpoint:
        key = None  # a bare state dict
    return _load(model, checkpoint, source, strict=True, key=key, skip_mismatched_head=False, finetune=True,
                 log=log, old_grid=None)
