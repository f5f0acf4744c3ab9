"""Feature maps of Vision Mamba models, as timm's VisionTransformer gives them.

:class:`FeatureMixin` adds ``forward_intermediates`` and ``prune_intermediate_layers`` (the methods
timm's ``features_only=True`` wrapper, ``FeatureGetterNet``, calls) to a model that provides
``layers`` (Vim blocks returning ``(hidden, residual)``), ``norm_f``, ``_embed(x) -> (tokens, grid)``,
``_prefix_positions(num_patches)`` (sequence indices of the class token or registers) and
``reset_classifier``.

A Vim block's output is the stream the next block adds to: ``residual + hidden`` (the final
``norm_f`` normalises the same sum after the last block). Intermediates are those sums with the
class token / registers taken out, so every map holds the patches in raster order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureMixin", "final_add_norm", "final_norm", "mean_patch_tokens", "take_indices"]


def take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's selection rule: None -> all blocks, an int n -> the last n, a sequence -> those indices
    (negative ones from the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices={indices} is out of range (1 to {num_blocks})")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = []
        for i in indices:
            j = num_blocks + i if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
            taken.append(j)
        if not taken:
            raise ValueError("indices is empty: name at least one block")
    return taken, max(taken)


def mean_patch_tokens(x: Tensor, prefix: list[int]) -> Tensor:
    """(B, L, D) -> (B, D): the mean over the patch tokens, the tokens at ``prefix`` (class token or
    registers) left out, as timm's ViT ``global_pool="avg"``."""
    is_patch = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    is_patch[prefix] = False
    return x[:, is_patch].mean(dim=1)


def final_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` in the norm's dtype (the residual stream is fp32); identity if the norm was pruned."""
    weight = getattr(norm, "weight", None)
    return norm(x if weight is None else x.to(weight.dtype))


def final_add_norm(norm: nn.Module, hidden: Tensor, residual: Tensor) -> Tensor:
    """``final_norm(norm, residual + hidden)``, the add fused into the norm's pass where it can be
    (:meth:`~shufflemamba.models.mamba_mixer.RMSNorm.add_forward`)."""
    fuses_add = getattr(norm, "fuses_add", None)
    if fuses_add is not None and fuses_add(hidden, residual):
        return norm.add_forward(hidden, residual)[0]
    return final_norm(norm, residual + hidden)


class FeatureMixin:
    """``forward_intermediates`` / ``prune_intermediate_layers`` for Vision Mamba models (see the module)."""

    layers: nn.ModuleList
    norm_f: nn.Module

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]] | dict[str, Any]:
        """Forward that also returns the outputs of chosen blocks (timm's VisionTransformer API).

        Args:
            x: images (B, C, H, W).
            indices: blocks to take: the last n if an int, all if None, else these indices
                (negative ones count from the end).
            return_prefix_tokens: pair each intermediate with its prefix tokens (B, P, D): the class
                token, or the registers in sequence order.
            norm: apply the final norm ``norm_f`` to every intermediate.
            stop_early: stop after the last block taken (the final features then come from it).
            output_fmt: ``"NCHW"`` (B, D, h, w) maps or ``"NLC"`` (B, h * w, D) tokens.
            intermediates_only: return only the intermediates.
            output_dict: return a dict with ``image_intermediates`` (and ``image_intermediates_prefix``,
                ``image_features``) instead.

        Returns:
            The intermediates, or ``(final_features, intermediates)`` where the final features are
            ``forward_features``' normalised sequence (B, L, D), or the dict.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, max_index = take_indices(len(self.layers), indices)
        batch = x.shape[0]
        x, (h, w) = self._embed(x)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        hidden, residual = x, None
        intermediates: list[Tensor] = []
        for i, layer in enumerate(layers):
            hidden, residual = layer(hidden, residual)
            if i in taken:
                out = residual + hidden  # (B, L, D): this block's output stream
                intermediates.append(final_norm(self.norm_f, out) if norm else out)

        prefix = self._prefix_positions(h * w)
        prefix_tokens = None
        if prefix:
            is_patch = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
            is_patch[prefix] = False
            prefix_tokens = [y[:, prefix] for y in intermediates]  # (B, P, D)
            intermediates = [y[:, is_patch] for y in intermediates]  # (B, h * w, D)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        final = None
        if not intermediates_only:
            final = final_add_norm(self.norm_f, self.drop_path(hidden), residual)
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if return_prefix_tokens and prefix_tokens is not None:
                result["image_intermediates_prefix"] = prefix_tokens
            if final is not None:
                result["image_features"] = final
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (final, intermediates)

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last one in ``indices`` (and the final norm / head if asked).

        Returns:
            The absolute indices kept (negative ones would be wrong after pruning).
        """
        taken, max_index = take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.slws_rates = self.slws_rates[: max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return taken
