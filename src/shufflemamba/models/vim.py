"""Vision Mamba (Vim, hustvl/Vim) and ShuffleMamba models, registered in timm.

Architecture (as hustvl/Vim's): Conv2d patch embedding, a class token in the middle of the sequence (Vim) or at
its head (ShuffleMamba), a learned absolute position embedding, ``depth`` Add -> Norm -> bidirectional
Mamba blocks with an fp32 residual stream, a final ``norm_f(residual + drop_path(hidden))``, the class
token's feature and a Linear head. Parameter names match the official checkpoints.

SLWS is built into the blocks (:class:`~shufflemamba.models.mamba_mixer.VimBlock` is a
:class:`~shufflemamba.slws.ShuffledLayer`) and configured by ``slws_rate`` / ``slws_schedule``.

Registered names (all 224 px, patch 16; keyword arguments of ``timm.create_model`` override):
``vim_{tiny,small,base}_patch16_224`` (middle class token, slws_rate 0),
``vim_{tiny,small}_patch16_stride8_224`` (Vim's "+" fine-tunes: overlapping patches, stride 8) and
``shufflemamba_{middle,base,large}_patch16_224`` (class token at the head, slws_rate 0.5; the middle
size uses LayerNorm as the reference code does). The register-token variants ``mambar_*`` live in
:mod:`shufflemamba.models.vim_reg`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from timm.layers import DropPath, lecun_normal_, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from torch import Tensor, nn

from ..slws import SCHEDULES, apply_slws
from .checkpoint import cls_token_index, resize_pos_embed
from .features import FeatureMixin, final_add_norm
from .mamba_mixer import INITS, VimBlock, make_norm
from .pretrained import default_cfgs, resolve_weights  # noqa: F401 (register_model reads default_cfgs here)

__all__ = ["PatchEmbed", "VisionMamba", "CLS_POSITIONS"]

CLS_POSITIONS = ("middle", "head")


class PatchEmbed(nn.Module):
    """Image to token sequence with one strided Conv2d: (B, C, H, W) -> (B, M, D).

    ``stride`` defaults to ``patch_size``; a smaller stride gives overlapping patches (Vim's "+"
    fine-tune uses stride 8 with patch 16). Inputs must be ``img_size`` unless ``dynamic_img_size``;
    then any size whose patches tile it exactly, or any size at all with ``dynamic_img_pad`` (zero
    padding at the bottom / right up to whole patches, as timm's PatchEmbed).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int | None = None,
                 in_chans: int = 3, embed_dim: int = 192, dynamic_img_size: bool = False,
                 dynamic_img_pad: bool = False) -> None:
        super().__init__()
        self.dynamic_img_size, self.dynamic_img_pad = dynamic_img_size, dynamic_img_pad
        self.img_size = tuple(to_2tuple(img_size))  # tuple() also for lists read back from yaml / json
        self.patch_size = tuple(to_2tuple(patch_size))
        self.stride = tuple(to_2tuple(stride or patch_size))
        self.grid_size = tuple((i - p) // s + 1 for i, p, s in zip(self.img_size, self.patch_size, self.stride))
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def _padding(self, size: tuple[int, int]) -> tuple[int, int]:
        """Bottom / right zero padding that makes ``size`` whole patches (0 without dynamic_img_pad)."""
        if not self.dynamic_img_pad:
            return (0, 0)
        return tuple(max(n, p) - n + (-(max(n, p) - p)) % s for n, p, s in zip(size, self.patch_size, self.stride))

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid (h, w) an input of ``img_size`` (H, W) gives."""
        pad = self._padding(img_size)
        return tuple((n + q - p) // s + 1 for n, q, p, s in zip(img_size, pad, self.patch_size, self.stride))

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        if not self.dynamic_img_size:
            if size != self.img_size:
                raise ValueError(f"input size {size} does not match the model's img_size {self.img_size} "
                                 "(build the model with dynamic_img_size=True for other sizes)")
        elif self.dynamic_img_pad:
            pad_h, pad_w = self._padding(size)
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
        elif any(n < p or (n - p) % s for n, p, s in zip(size, self.patch_size, self.stride)):
            raise ValueError(f"input size {size} is not tiled by patches {self.patch_size} at stride {self.stride} "
                             "(pad it, or build the model with dynamic_img_pad=True)")
        if self._as_matmul(x):
            B, C, H, W = x.shape
            (ph, pw), (h, w) = self.patch_size, (H // self.patch_size[0], W // self.patch_size[1])
            # (B, C, h, ph, w, pw) -> (B, h, w, C, ph, pw): each patch's pixels in the weight's (C, ph, pw) order
            cols = x.reshape(B, C, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * ph * pw)
            weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, C ph pw)
            return torch.nn.functional.linear(cols, weight, self.proj.bias)  # (B, M, D)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, M, D)

    # Small non-overlapping patches (up to this many values, C ph pw) are embedded as one matmul: the same
    # sums without the strided Conv2d's fixed cost, which dominates at that size (faster on CPU up to 64).
    MATMUL_MAX = 64

    def _as_matmul(self, x: Tensor) -> bool:
        ph, pw = self.patch_size
        return (self.stride == self.patch_size and self.proj.in_channels * ph * pw <= self.MATMUL_MAX
                and x.shape[-2] % ph == 0 and x.shape[-1] % pw == 0)


class VisionMamba(FeatureMixin, nn.Module):
    """Vision Mamba / ShuffleMamba classifier.

    Initialisation (``init``): every choice draws the position embedding trunc-normal (std 0.02),
    the patch projection LeCun-normal with a zero bias, the head trunc-normal (std 0.02) with a zero
    bias, ``out_proj.weight`` kaiming-uniform divided by sqrt(depth), ``A_log = log(1..N)``, ``D = 1``.
    ``"vim"`` (hustvl/Vim, and Mamba-Reg's ``models_reg.py``): class token trunc-normal (std 0.02),
    Linear biases zero except ``dt_proj`` (Mamba's dt init), so ``dt_proj_b.bias`` is zero.
    ``"shufflemamba"`` (ShuffleMamba's ``models_shuffle.py``): timm's segmentation init over the
    whole model, so every Linear weight trunc-normal (std 0.02) with a zero bias (both dt biases
    zero) and the class token left at zero. ``"mamba"``: as "vim" but both directions get Mamba's dt
    init. Details in :class:`~shufflemamba.models.mamba_mixer.BiMambaMixer`. Registered models
    default to their reference's init: ``vim_*`` and ``mambar_*`` "vim", ``shufflemamba_*``
    "shufflemamba".

    Any input size (``dynamic_img_size``, timm's ViT semantics): the position embedding is resized
    bicubically on the patch grid at every forward whose grid differs from the built one, the class
    token's row taken out and put back at its index for the new grid (``middle``: M // 2). As timm
    ViTs do, ``forward_intermediates`` gives block outputs as (B, D, h, w) maps and
    ``features_only=True`` builds a backbone (``feature_info``: one entry per block).

    Args:
        img_size: input resolution (int or (H, W)); the size ``pos_embed`` is built for.
        patch_size: patch (conv kernel) size.
        stride: patch stride (defaults to ``patch_size``).
        in_chans: input channels.
        num_classes: classes of the head (0: no head, ``forward`` returns features).
        embed_dim: token width D.
        depth: number of blocks.
        d_state: SSM state size N.
        d_conv: causal conv kernel size of the mixer.
        expand: mixer expansion E / D.
        dt_rank: dt projection rank (``None``: ceil(D / 16)).
        init: ``"vim"``, ``"shufflemamba"`` or ``"mamba"`` (see above).
        drop_rate: dropout after the position embedding and before the head.
        drop_path_rate: stochastic depth; block i uses ``([0] + linspace(0, r, depth))[i]``, the final
            add uses ``r``.
        cls_position: ``"middle"`` (Vim: index M // 2) or ``"head"`` (index 0).
        norm_layer: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm).
        norm_eps: epsilon of the norms.
        residual_in_fp32: keep the residual stream in float32.
        slws_rate: SLWS probability of the last block (0 disables SLWS).
        slws_schedule: ``"linear"`` or ``"constant"`` (see :func:`shufflemamba.slws.shuffle_rates`).
        slws_per_sample: per-sample SLWS decisions and permutations (off in the paper).
        slws_keep_cls: never move the class token when shuffling (the paper moves it).
        scan_impl: selective-scan implementation passed to ``shufflemamba.ops.selective_scan``.
        dynamic_img_size: accept any input size, resizing the position embedding on the fly
            (``slws_keep_cls`` then keeps the class-token index of the built size).
        dynamic_img_pad: with ``dynamic_img_size``, zero-pad inputs to whole patches.

    Attributes:
        model_kwargs: the constructor's keyword arguments; ``VisionMamba(**model.model_kwargs)``
            rebuilds the architecture (used by training checkpoints).
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        init: Literal["vim", "shufflemamba", "mamba"] = "vim",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cls_position: str = "middle",
        norm_layer: str = "rms",
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        slws_rate: float = 0.0,
        slws_schedule: str = "linear",
        slws_per_sample: bool = False,
        slws_keep_cls: bool = False,
        scan_impl: str = "auto",
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.model_kwargs: dict[str, Any] = {k: v for k, v in locals().items()
                                             if k not in ("self", "__class__")}
        if isinstance(img_size, (tuple, list)) and len(set(img_size)) == 1:
            self.model_kwargs["img_size"] = int(img_size[0])  # timm passes (224, 224); keep it plain
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
        if slws_schedule not in SCHEDULES:
            raise ValueError(f"slws_schedule must be one of {SCHEDULES}, got {slws_schedule!r}")
        for name, val in (("embed_dim", embed_dim), ("depth", depth), ("d_state", d_state), ("patch_size", patch_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.init = init
        self.cls_position = cls_position
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, stride=stride,
                                      in_chans=in_chans, embed_dim=embed_dim, dynamic_img_size=dynamic_img_size,
                                      dynamic_img_pad=dynamic_img_pad)
        self.dynamic_img_size = dynamic_img_size
        num_patches = self.patch_embed.num_patches
        self.cls_index = cls_token_index(num_patches, cls_position)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        inter_dpr = [0.0] + dpr  # block i drops the previous block's mixer output at rate inter_dpr[i]
        mixer_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, init=init,
                            scan_impl=scan_impl)
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, mixer_kwargs=mixer_kwargs, norm_layer=norm_layer, norm_eps=norm_eps,
                     drop_path=inter_dpr[i], residual_in_fp32=residual_in_fp32)
            for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = make_norm(norm_layer, embed_dim, norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        stride = self.patch_embed.stride
        reduction = stride[0] if stride[0] == stride[1] else stride
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]

        # the same SLWS mechanism as for any block list: sets each VimBlock's rate in place
        self.slws_rates = apply_slws(self.layers, slws_rate, slws_schedule, per_sample=slws_per_sample,
                                     keep_positions=(self.cls_index,) if slws_keep_cls else None)
        self.init_weights()

    # -- init --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The model-level part of ``self.init`` (see the class docstring); the mixers initialise their
        own projections, dt, A_log and D when built. No-op on the meta device."""
        if self.pos_embed.is_meta:
            return
        trunc_normal_(self.pos_embed, std=0.02)
        if self.init == "shufflemamba":
            nn.init.zeros_(self.cls_token)  # models_shuffle.py never draws it
        else:
            trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and self.init == "shufflemamba":
                nn.init.ones_(m.weight)  # the segmentation init resets LayerNorms (PyTorch's default anyway)
                nn.init.zeros_(m.bias)
            if name.endswith("mixer.out_proj"):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                m.weight.div_(math.sqrt(self.depth))  # one residual branch per block
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # -- timm interface ----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of parameters without weight decay: pos_embed, cls_token, A_log / D (+ _b twins)."""
        names = {"pos_embed", "cls_token"}
        names.update(n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each block (inside its SLWS shuffle, so recomputation reuses the permutation)."""
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"VisionMamba pools the class token only; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.model_kwargs["num_classes"] = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_slws(self, rate: float, schedule: str = "linear", **options: Any) -> list[float]:
        """Change the SLWS rates of all blocks in place (e.g. 0 for fine-tuning); returns the rates."""
        self.slws_rates = apply_slws(self.layers, rate, schedule, **options)
        self.model_kwargs.update(slws_rate=rate, slws_schedule=schedule)
        return self.slws_rates

    # -- forward -----------------------------------------------------------------------------------
    def _cls_index_for(self, num_patches: int) -> int:
        return cls_token_index(num_patches, self.cls_position)

    def _prefix_positions(self, num_patches: int) -> list[int]:
        """Sequence indices of the non-patch tokens for ``num_patches`` patches: the class token."""
        return [self._cls_index_for(num_patches)]

    def _pos_embed_for(self, grid: tuple[int, int], cls_position: str | None) -> Tensor:
        """``pos_embed``, resized (bicubic, differentiably) when ``grid`` is not the built one."""
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, cls_position)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> embedded sequence (B, M + 1, D) with position embedding, and the grid (h, w)."""
        grid = self.patch_embed.feat_size(tuple(x.shape[-2:]))
        x = self.patch_embed(x)  # (B, M, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        i = self._cls_index_for(x.shape[1])
        x = torch.cat((x[:, :i], cls, x[:, i:]), dim=1)  # (B, M + 1, D)
        return self.pos_drop(x + self._pos_embed_for(grid, self.cls_position)), grid

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised token sequence (B, M + 1, D), class token at index M // 2 or 0."""
        hidden, residual = self._embed(x)[0], None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return final_add_norm(self.norm_f, self.drop_path(hidden), residual)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, M + 1, D) -> logits (B, num_classes), or the class-token feature (B, D) if pre_logits."""
        x = self.head_drop(x[:, self._cls_index_for(x.shape[1] - 1)])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook for ``pretrained=True`` (see :mod:`shufflemamba.models.pretrained`)."""
        from .pretrained import load_pretrained

        load_pretrained(self, checkpoint_path)


# -- timm registration ---------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VisionMamba) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: unwrap / clean a checkpoint and resize pos_embed for ``model``."""
    from .checkpoint import prepare_state_dict

    return prepare_state_dict(state_dict, model)


def build_vim(variant: str, pretrained: bool = False, model_cls: type[VisionMamba] | None = None,
            **kwargs: Any) -> VisionMamba:
    """Build ``variant`` (a :class:`VisionMamba`, or ``model_cls``) through timm (pretrained configs and
    weight loading: :mod:`shufflemamba.models.pretrained`)."""
    if pretrained:
        kwargs = resolve_weights(variant, kwargs)  # a local file (Hub files fetched first), else a clear error
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's ViT
    return build_model_with_cfg(model_cls or VisionMamba, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


# each family's defaults are its reference's, initialisation included
_VIM = dict(patch_size=16, depth=24, cls_position="middle", norm_layer="rms", slws_rate=0.0, init="vim")
_SM = dict(patch_size=16, cls_position="head", norm_layer="rms", slws_rate=0.5, init="shufflemamba")


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti: D 192, depth 24, middle class token (7.15M parameters)."""
    return build_vim("vim_tiny_patch16_224", pretrained, **{**_VIM, "embed_dim": 192, **kwargs})


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S: D 384, depth 24, middle class token (25.8M parameters)."""
    return build_vim("vim_small_patch16_224", pretrained, **{**_VIM, "embed_dim": 384, **kwargs})


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti+: Vim-Ti with patch stride 8 (27 x 27 overlapping patches), as Vim's "+" fine-tune."""
    return build_vim("vim_tiny_patch16_stride8_224", pretrained, **{**_VIM, "embed_dim": 192, "stride": 8, **kwargs})


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S+: Vim-S with patch stride 8 (27 x 27 overlapping patches), as Vim's "+" fine-tune."""
    return build_vim("vim_small_patch16_stride8_224", pretrained, **{**_VIM, "embed_dim": 384, "stride": 8, **kwargs})


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-B: D 768, depth 24, middle class token (97.6M parameters)."""
    return build_vim("vim_base_patch16_224", pretrained, **{**_VIM, "embed_dim": 768, **kwargs})


@register_model
def shufflemamba_middle_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """ShuffleMamba-M: D 576, depth 32, class token at the head, LayerNorm, SLWS 0.5 (~74M)."""
    defaults = {**_SM, "embed_dim": 576, "depth": 32, "norm_layer": "layer"}
    return build_vim("shufflemamba_middle_patch16_224", pretrained, **{**defaults, **kwargs})


@register_model
def shufflemamba_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """ShuffleMamba-B: D 768, depth 24, class token at the head, SLWS 0.5 (~98M)."""
    return build_vim("shufflemamba_base_patch16_224", pretrained, **{**_SM, "embed_dim": 768, "depth": 24, **kwargs})


@register_model
def shufflemamba_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """ShuffleMamba-L: D 1024, depth 48, class token at the head, SLWS 0.5 (~340M)."""
    return build_vim("shufflemamba_large_patch16_224", pretrained, **{**_SM, "embed_dim": 1024, "depth": 48, **kwargs})
