"""Loading Vim / ShuffleMamba checkpoints, with position-embedding resizing for both class-token positions.

Official Vim checkpoints are dicts with the state dict under ``"model"``; training checkpoints of this
project use ``"model"`` too (and ``"model_ema"``). The position embedding is ``(1, M + 1, D)`` with the
class token at index ``M // 2`` ("middle", Vim) or ``0`` ("head", ShuffleMamba). To fine-tune at another
resolution the class-token row must be taken out at the OLD index, the patch rows resized as a 2D grid,
and the class-token row put back at the NEW index (the official code reuses the old index).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["resize_pos_embed", "prepare_state_dict", "load_checkpoint", "CHECKPOINT_KEYS"]

# where a state dict may sit inside a checkpoint dict, in order of preference
CHECKPOINT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def _grid(grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return (grid, grid)
    h, w = (int(g) for g in grid)
    return (h, w)


def _cls_index(num_patches: int, cls_position: str | None) -> int | None:
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
    i_old = _cls_index(m_old, cls_position)
    m_new = new_grid[0] * new_grid[1]
    i_new = _cls_index(m_new, cls_position)
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
    """Unwrap a checkpoint (raw / ``{"model": ...}`` / ...), strip a DDP ``module.`` prefix, resize pos_embed.

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
    return state


def load_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    *,
    key: str | None = None,
    skip_mismatched_head: bool = False,
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
        skip_mismatched_head: drop ``head.*`` entries whose shapes differ (fine-tuning to new classes).
        old_grid: the checkpoint's patch grid when it is not square.
        weights_only: passed to ``torch.load``; official Vim files pickle their argparse arguments and
            need ``weights_only=False`` (only for files you trust).

    Returns:
        ``load_state_dict``'s result (missing and unexpected keys).

    Raises:
        ValueError: shapes or (with ``strict``) key sets differ, naming the first offending keys.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        try:
            checkpoint = torch.load(path_or_state, map_location="cpu", weights_only=weights_only)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix the user needs
            if weights_only and "weights_only" in str(e):
                raise ValueError(f"{path_or_state} holds non-tensor objects; if you trust the file, "
                                 "call load_checkpoint(..., weights_only=False)") from e
            raise
    else:
        checkpoint = path_or_state
    state = prepare_state_dict(checkpoint, model, key=key, old_grid=old_grid)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if skip_mismatched_head:
        for k in [k for k in mismatched if k.startswith("head.")]:
            del state[k]
        mismatched = [k for k in mismatched if not k.startswith("head.")]
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in mismatched[:4])
        raise ValueError(f"checkpoint does not match the model architecture ({len(mismatched)} shape "
                         f"mismatch(es)): {detail}")
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if skip_mismatched_head:
            missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint keys do not match the model: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        strict = not skip_mismatched_head
    return model.load_state_dict(state, strict=strict)
