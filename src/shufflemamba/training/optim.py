"""The optimiser: AdamW as training builds it, and which parameters get weight decay.

Two rules, chosen by the config key ``wd_grouping``:

``"reference"``
    What both reference trainers do (huangzizheng01/ShuffleMamba ``main_shuffle.py`` /
    ``main_reg.py`` and hustvl/Vim ``vim/main.py``): they call timm 0.4.12's
    ``create_optimizer(args, model)``, whose ``add_weight_decay`` exempts a parameter when it has
    exactly one dimension, its name ends in ``.bias``, or its name is in ``model.no_weight_decay()``.
    The reference models list only their tokens there (``pos_embed``, ``cls_token`` and, for the
    register models, ``pos_embed_cls``), so Mamba's ``A_log`` / ``A_b_log`` (2-D, ``(E, N)``) ARE
    decayed, while ``D`` / ``D_b`` (1-D), norms and biases are not. Our models' ``no_weight_decay()``
    also names the SSM parameters that mamba_ssm marks ``_no_weight_decay``; this rule drops those
    names again, which leaves the reference list. One more detail of timm 0.4.12 kept on purpose: its
    test is ``len(shape) == 1``, so a 0-d (scalar) parameter would be decayed (our models have none).

``"mamba"``
    The Mamba convention (and this project's behaviour before the option existed): additionally
    exempt every name in ``model.no_weight_decay()``, i.e. ``A_log`` / ``A_b_log`` too. This is
    timm 1.x's ``param_groups_weight_decay`` rule (``ndim <= 1``, ``.bias``, or a name matching a
    listed fnmatch pattern), which ``create_optimizer_v2(model, ...)`` applied before.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatch
from typing import Any, Literal, get_args

import torch
import torch.nn as nn

WdGrouping = Literal["reference", "mamba"]
WD_GROUPINGS: tuple[str, ...] = get_args(WdGrouping)


def no_weight_decay_names(model: nn.Module, *, grouping: WdGrouping) -> set[str]:
    """Names of the trainable parameters exempt from weight decay under ``grouping``.

    Args:
        model: the model (not a DDP wrapper: names must be the model's own).
        grouping: ``"reference"`` or ``"mamba"`` (see the module docstring).

    Returns:
        Parameter names (as in ``model.named_parameters()``) that get weight decay 0.

    Raises:
        ValueError: unknown ``grouping``.
    """
    if grouping not in WD_GROUPINGS:
        raise ValueError(f"grouping must be one of {WD_GROUPINGS}, got {grouping!r}")
    params = dict(model.named_parameters())
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if grouping == "reference":
        # the reference models' lists hold tokens only: drop what mamba_ssm's marking put there
        listed = {n for n in listed if not (n in params and getattr(params[n], "_no_weight_decay", False))}
    out = set()
    for name, p in params.items():
        if not p.requires_grad:
            continue
        if grouping == "reference":  # timm 0.4.12: one dimension, exact names
            skip = p.ndim == 1 or name in listed
        else:  # timm 1.x: at most one dimension, fnmatch patterns
            skip = p.ndim <= 1 or any(fnmatch(name, pattern) for pattern in listed)
        if skip or name.endswith(".bias"):
            out.add(name)
    return out


def param_groups_weight_decay(model: nn.Module, *, weight_decay: float, grouping: WdGrouping) -> list[dict[str, Any]]:
    """Two optimiser parameter groups: no decay first, then decay (timm's order).

    Frozen parameters (``requires_grad=False``) are left out, as timm does.

    Args:
        model: the model (unwrapped).
        weight_decay: decay of the second group.
        grouping: ``"reference"`` or ``"mamba"`` (see the module docstring).

    Returns:
        ``[{"params": [...], "weight_decay": 0.0}, {"params": [...], "weight_decay": weight_decay}]``
        for ``torch.optim`` / timm's ``create_optimizer_v2``.
    """
    skip = no_weight_decay_names(model, grouping=grouping)
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def fused_adam_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused Adam(W) can take these parameters (CPU / CUDA floats): one kernel per
    parameter instead of a dozen foreach ops over all of them, the same update rule
    (tests/test_optim.py holds it to the single-tensor loop). Training uses it, and so does
    ``shufflemamba bench`` for both models it compares."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                 torch.float64) for p in params)


def build_optimizer(model: nn.Module, cfg: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """The configured optimiser (timm's factory) over :func:`param_groups_weight_decay`'s groups."""
    from timm.optim import create_optimizer_v2

    extra: dict[str, Any] = {}
    if cfg["opt"].lower() in ("adam", "adamw") and fused_adam_supported(model.parameters()):
        extra["fused"] = True
    return create_optimizer_v2(  # groups carry their own decay (config key wd_grouping)
        param_groups_weight_decay(model, weight_decay=cfg["weight_decay"], grouping=cfg["wd_grouping"]),
        opt=cfg["opt"], lr=lr, betas=tuple(cfg["opt_betas"]), eps=cfg["opt_eps"], **extra,
    )
