"""UperNet on a plain Vision Mamba backbone: four block taps -> strides 4 / 8 / 16 / 32 -> UPerHead,
with an auxiliary FCN head on the stride-32 map during training.

The backbone is any of our registered models (``forward_intermediates``: block outputs as (B, D, h, w)
maps with the class token / registers taken out, any input size with ``dynamic_img_size``). As in
hustvl/Vim's ``seg/backbone``, the four same-stride taps become a pyramid by transposed convolutions,
identity and max-pooling (:class:`PlainPyramid`). The heads follow mmsegmentation's UPerHead and
FCNHead (1x1 / 3x3 conv + BatchNorm + ReLU blocks, Dropout2d, a 1x1 classifier).

Written here with torch layers rather than taken from segmentation_models_pytorch: its
``UPerNetDecoder`` puts a LayerNorm on every input map and forces BatchNorm in the pyramid-pooling
output, which the reference UPerHead does not have, and it has no auxiliary head.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with BN: bias-free conv (kaiming normal, fan_out), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _classifier(cin: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's conv_seg init
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PlainPyramid(nn.Module):
    """Four maps at the patch stride -> strides 4, 8, 16, 32 (patch 16: 4x up, 2x up, identity, 2x
    down; patch 8: 2x up, identity, 2x down, 4x down)."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        up = lambda: nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)  # noqa: E731
        if patch_size == 16:
            self.fpn1 = nn.Sequential(up(), nn.BatchNorm2d(dim), nn.GELU(), up())
            self.fpn2, self.fpn3, self.fpn4 = up(), nn.Identity(), nn.MaxPool2d(2, 2)
        elif patch_size == 8:
            self.fpn1, self.fpn2 = up(), nn.Identity()
            self.fpn3, self.fpn4 = nn.MaxPool2d(2, 2), nn.MaxPool2d(4, 4)
        else:
            raise ValueError(f"the pyramid is built for patch size 16 or 8, got {patch_size}")

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class UPerHead(nn.Module):
    """Pyramid pooling on the coarsest map, a top-down FPN, all levels fused at stride 4."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, *,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.psp = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.psp_bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = _classifier(channels, num_classes)

    def forward(self, feats: list[Tensor]) -> Tensor:
        top = feats[-1]
        pooled = [_resize(branch(top), top.shape[2:]) for branch in self.psp]
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        laterals.append(self.psp_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the (summed) coarser one
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg's FCNHead with one conv and no input concat: the auxiliary loss's head."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNetSegmentor(nn.Module):
    """Backbone + pyramid + UPerHead (+ FCN auxiliary head when ``aux_channels`` and training).

    ``forward(x)`` returns logits at the input's size (B, num_classes, H, W) in eval mode, and
    ``(logits, aux_logits or None)`` in training mode. Inputs of any size: they are zero-padded to a
    multiple of 2 x the patch stride and the logits cropped back.
    """

    def __init__(self, backbone: nn.Module, out_indices: Sequence[int], num_classes: int, *, head_channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_channels: int = 256, use_aux: bool = True,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_indices = [int(i) for i in out_indices]
        dim = backbone.embed_dim
        self.patch = int(backbone.patch_embed.stride[0])
        self.num_classes = num_classes
        self.neck = PlainPyramid(dim, self.patch)
        self.decode_head = UPerHead([dim] * 4, head_channels, num_classes, pool_scales=pool_scales, dropout=dropout)
        self.aux_head = FCNHead(dim, aux_channels, num_classes, dropout=dropout) if use_aux else None

    def features(self, x: Tensor) -> list[Tensor]:
        feats = self.backbone.forward_intermediates(x, indices=self.out_indices, intermediates_only=True, stop_early=True)
        return self.neck(feats)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        h, w = x.shape[-2:]
        mult = 2 * self.patch
        ph, pw = (-h) % mult, (-w) % mult
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        pyramid = self.features(x)
        logits = _resize(self.decode_head(pyramid), x.shape[-2:])[..., :h, :w]
        if not self.training:
            return logits
        aux = None
        if self.aux_head is not None:
            aux = _resize(self.aux_head(pyramid[3]), x.shape[-2:])[..., :h, :w]
        return logits, aux


def build_backbone(cfg: dict[str, Any], log: Any = print) -> tuple[nn.Module, list[int]]:
    """Our registered model at the crop size (pos_embed built there; resized on the fly for other
    sizes), no classifier, SLWS at ``slws_rate``; weights from ``pretrained`` or ``init_from``
    (pos_embed resized to the crop); blocks after the last tap, the final norm and head pruned."""
    from ..errors import UserError
    from ..training.model_setup import build_model, is_our_model

    if not is_our_model(cfg["model"]):
        raise UserError(f"--task segmentation needs one of our Vim / ShuffleMamba models; '{cfg['model']}' is not one")
    kwargs = {"img_size": cfg["crop_size"], "drop_path_rate": cfg["drop_path"], "slws_rate": cfg["slws_rate"],
              "dynamic_img_size": True, **cfg["model_kwargs"]}
    model = build_model(cfg["model"], kwargs)  # checks the name and kwargs with one-line errors
    if cfg["pretrained"]:  # the released weights (a local file or the Hub cache; see models/pretrained.py)
        import timm

        try:
            model = timm.create_model(cfg["model"], pretrained=True, **kwargs)
        except (ValueError, RuntimeError, OSError) as err:
            raise UserError(f"pretrained weights for '{cfg['model']}': {str(err).splitlines()[0]}") from None
    if cfg["init_from"]:
        from ..models.checkpoint import init_from_checkpoint
        from ..training.checkpointing import load_training_checkpoint

        ckpt = load_training_checkpoint(cfg["init_from"])
        if ckpt.get("task") == "segmentation":
            raise UserError(f"--init-from '{cfg['init_from']}' is a segmentation run; continue it with --resume")
        try:
            init_from_checkpoint(model, ckpt, key="model", log=log, source=cfg["init_from"])
        except ValueError as err:
            raise UserError(f"--init-from '{cfg['init_from']}' does not fit model '{cfg['model']}': {err}") from None
    depth = len(model.layers)
    bad = [i for i in cfg["out_indices"] if not -depth <= i < depth]
    if bad:
        raise UserError(f"out_indices {cfg['out_indices']} name blocks outside the model's {depth}")
    taken = model.prune_intermediate_layers(cfg["out_indices"], prune_norm=True, prune_head=True)
    return model, taken


def build_segmentor(cfg: dict[str, Any], num_classes: int, log: Any = print) -> UperNetSegmentor:
    from ..errors import UserError

    backbone, out_indices = build_backbone(cfg, log)
    try:
        return UperNetSegmentor(backbone, out_indices, num_classes, head_channels=cfg["head_channels"],
                                pool_scales=cfg["pool_scales"], aux_channels=cfg["aux_channels"],
                                use_aux=cfg["aux_weight"] > 0, dropout=cfg["dropout"])
    except ValueError as err:
        raise UserError(f"model '{cfg['model']}': {err}") from None
