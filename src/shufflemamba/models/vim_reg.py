"""Vision Mamba with registers (Mamba-Reg, Wang et al. 2024), as trained by ShuffleMamba's Reg recipe.

Registers replace the class token: ``R`` learned tokens spread evenly through the patch sequence.
With ``M`` patches and ``G = M // (R + 1)``, the patches are cut into ``R`` groups of ``G`` and
register ``i`` follows group ``i`` (sequence index ``(i + 1) * G + i``); the ``M - R * G`` patches left
over come after the last register. At 224 px (14 x 14 patches) with 12 registers they sit at
15, 31, ..., 191 of 208 tokens. The patches get ``pos_embed`` (1, M, D) and dropout; the registers get
their own ``pos_embed_cls`` (1, R, D). The head reads the R register outputs after ``norm_f``: each is
reduced by ``neck`` (Linear D -> D / cls_reduce, no bias; absent when cls_reduce is 1), they are
concatenated and normalised by ``norm_neck``, and a Linear head maps the R * D / cls_reduce features to
the classes. Parameter names follow the reference code: ``cls_token`` (the registers, (1, R, D)),
``pos_embed_cls``, ``pos_embed``, ``neck``, ``norm_neck``, ``head``; the blocks are Vim's.

SLWS shuffles the whole sequence, registers included, and puts every token back afterwards, as the
reference code does (``slws_keep_cls`` keeps the registers in place instead).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from ..slws import apply_slws
from .mamba_mixer import make_norm
from .pretrained import default_cfgs  # noqa: F401 (register_model reads default_cfgs here)
from .vim import VisionMamba, build_vim

__all__ = ["VisionMambaReg", "register_positions"]


def register_positions(num_patches: int, num_registers: int) -> list[int]:
    """Sequence indices of the registers among ``num_patches + num_registers`` tokens."""
    group = num_patches // (num_registers + 1)
    if group < 1:
        raise ValueError(f"{num_registers} registers need at least {num_registers + 1} patches, got {num_patches}")
    return [(i + 1) * group + i for i in range(num_registers)]


def _token_order(num_patches: int, num_registers: int) -> Tensor:
    """Sequence position -> row of cat(patches, registers): registers at their positions, patches in order."""
    n = num_patches + num_registers
    order = torch.empty(n, dtype=torch.long)
    is_reg = torch.zeros(n, dtype=torch.bool)
    is_reg[register_positions(num_patches, num_registers)] = True
    order[is_reg] = torch.arange(num_patches, n)
    order[~is_reg] = torch.arange(num_patches)
    return order


class VisionMambaReg(VisionMamba):
    """Vim with register tokens instead of a class token (see the module docstring).

    Args:
        num_registers: number of register tokens R (12 for tiny / small / base, 16 for large).
        cls_reduce: each register feature is reduced from D to D / cls_reduce before the head
            (1: no reduction, no ``neck`` / ``norm_neck``).
        **kwargs: :class:`~shufflemamba.models.VisionMamba`'s arguments (``cls_position`` is unused).
    """

    def __init__(self, *, num_registers: int = 12, cls_reduce: int = 1, **kwargs: Any) -> None:
        for name, val in (("num_registers", num_registers), ("cls_reduce", cls_reduce)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        embed_dim = kwargs.get("embed_dim", 192)
        if embed_dim % cls_reduce:
            raise ValueError(f"cls_reduce {cls_reduce} must divide embed_dim {embed_dim}")
        super().__init__(**kwargs)
        self.model_kwargs.update(num_registers=num_registers, cls_reduce=cls_reduce)
        D, R, M = self.embed_dim, num_registers, self.patch_embed.num_patches
        self.num_registers, self.cls_reduce = R, cls_reduce
        self.register_index = register_positions(M, R)
        self.register_buffer("token_order", _token_order(M, R), persistent=False)
        self.num_prefix_tokens = 0  # registers are spread through the sequence, not a prefix
        self.cls_position = self.cls_index = None  # no class token

        # replace the class token, its position row and the head built by VisionMamba
        self.cls_token = nn.Parameter(torch.zeros(1, R, D))  # the registers
        self.pos_embed = nn.Parameter(torch.zeros(1, M, D))  # patches only
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, R, D))
        if cls_reduce > 1:
            self.neck = nn.Linear(D, D // cls_reduce, bias=False)
            self.norm_neck = make_norm(kwargs.get("norm_layer", "rms"), R * D // cls_reduce,
                                       kwargs.get("norm_eps", 1e-5))
        self.num_features = self.head_hidden_size = R * D // cls_reduce
        self.reset_classifier(self.num_classes)
        if kwargs.get("slws_keep_cls", False):
            self.slws_rates = apply_slws(self.layers, kwargs.get("slws_rate", 0.0),
                                         kwargs.get("slws_schedule", "linear"),
                                         per_sample=kwargs.get("slws_per_sample", False),
                                         keep_positions=tuple(self.register_index))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """VisionMamba's init, plus trunc-normal (std 0.02) register position embedding and neck."""
        super().init_weights()
        if hasattr(self, "pos_embed_cls") and not self.pos_embed_cls.is_meta:
            trunc_normal_(self.pos_embed_cls, std=0.02)
            if hasattr(self, "neck"):
                trunc_normal_(self.neck.weight, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"pos_embed_cls"}

    def _prefix_positions(self, num_patches: int) -> list[int]:
        """Sequence indices of the registers for ``num_patches`` patches (they move with the grid)."""
        if num_patches == self.patch_embed.num_patches:
            return self.register_index
        return register_positions(num_patches, self.num_registers)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, M + R, D) with registers spread by the grid's M, and the grid (h, w).

        ``forward_features`` (VisionMamba's) runs the blocks on it; the sequence it returns has the
        registers at ``register_positions(M, R)`` (``register_index`` at the built size).
        """
        grid = self.patch_embed.feat_size(tuple(x.shape[-2:]))
        x = self.pos_drop(self.patch_embed(x) + self._pos_embed_for(grid, None))  # (B, M, D): no class row
        m = x.shape[1]
        order = self.token_order if m == self.patch_embed.num_patches else _token_order(m, self.num_registers)
        registers = (self.cls_token + self.pos_embed_cls).expand(x.shape[0], -1, -1)  # (B, R, D)
        return torch.cat((x, registers), dim=1)[:, order.to(x.device)], grid  # (B, M + R, D), registers spread

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """VisionMamba's, and with the head the register neck (``neck``, ``norm_neck``) goes too."""
        if prune_head and hasattr(self, "neck"):
            del self.neck, self.norm_neck
            self.num_features = self.head_hidden_size = self.num_registers * self.embed_dim
        return super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, M + R, D) -> logits, or the (B, R * D / cls_reduce) register feature if pre_logits."""
        x = x[:, self._prefix_positions(x.shape[1] - self.num_registers)]  # (B, R, D)
        if hasattr(self, "neck"):
            x = self.norm_neck(self.neck(x).flatten(1))  # (B, R * D / cls_reduce)
        else:
            x = x.flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


# -- timm registration ---------------------------------------------------------------------------------

def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    return build_vim(variant, pretrained, model_cls=VisionMambaReg, **kwargs)


# models_reg.py re-inits the patch embedding, head and neck and keeps Vim's init otherwise: init "vim"
_REG = dict(patch_size=16, depth=24, norm_layer="rms", slws_rate=0.0, num_registers=12, init="vim")


@register_model
def mambar_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    """Mamba-Reg-Ti: D 192, depth 24, 12 registers, no neck."""
    return _create("mambar_tiny_patch16_224", pretrained, **{**_REG, "embed_dim": 192, "cls_reduce": 1, **kwargs})


@register_model
def mambar_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    """Mamba-Reg-S: D 384, depth 24, 12 registers reduced to 192 features each."""
    return _create("mambar_small_patch16_224", pretrained, **{**_REG, "embed_dim": 384, "cls_reduce": 2, **kwargs})


@register_model
def mambar_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    """Mamba-Reg-B: D 768, depth 24, 12 registers reduced to 192 features each."""
    return _create("mambar_base_patch16_224", pretrained, **{**_REG, "embed_dim": 768, "cls_reduce": 4, **kwargs})


@register_model
def mambar_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    """Mamba-Reg-L: D 1024, depth 48, 16 registers reduced to 128 features each."""
    defaults = {**_REG, "embed_dim": 1024, "depth": 48, "num_registers": 16, "cls_reduce": 8}
    return _create("mambar_large_patch16_224", pretrained, **{**defaults, **kwargs})
