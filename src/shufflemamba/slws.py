"""Stochastic Layer-Wise Shuffle (SLWS), Huang et al., ICML 2025 (arXiv 2408.17081).

A training-only regulariser for plain sequence models. Layer ``l`` of ``L`` is, with probability
``p_l``, run on a randomly permuted token sequence and its output is put back in the original order:

    perm = randperm(N);  out = layer(x[:, perm])[:, argsort(perm)]

Token-wise parts of a layer (norms, MLPs, residual adds, drop-path) are unaffected; only the
order-sensitive part (the Mamba scan, or nothing at all for attention without position bias) sees a
shuffled sequence. ``p_l`` grows with depth (:func:`shuffle_rates`).

One implementation serves every use:

* :class:`ShuffledLayer` is a base class holding the SLWS settings of one layer and the
  shuffle / restore logic (:meth:`ShuffledLayer.shuffled_call`).
* :class:`LayerShuffle` is a ``ShuffledLayer`` that wraps any module (a timm ViT block, a Mamba
  language-model block, ...).
* Our Vim blocks subclass ``ShuffledLayer`` directly, so their parameters keep the official names
  (``layers.{i}.norm.weight``, not ``layers.{i}.module.norm.weight``) and official checkpoints load.
* :func:`apply_slws` configures a block list: blocks that already are ``ShuffledLayer`` get their
  rate set in place, any other block is wrapped in a ``LayerShuffle``.

``LayerShuffle`` is transparent in ``state_dict``: its keys are those of the wrapped module (the
``module.`` level is removed on save and added back on load), so a wrapped timm ViT saves and loads
the same checkpoints as an unwrapped one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["shuffle_rates", "ShuffledLayer", "LayerShuffle", "apply_slws", "SCHEDULES"]

SCHEDULES = ("linear", "constant")


def _check_rate(rate: Any, name: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(rate).__name__}")
    rate = float(rate)
    if not (0.0 <= rate <= 1.0) or math.isnan(rate):
        raise ValueError(f"{name} must be in [0, 1], got {rate}")
    return rate


def shuffle_rates(max_rate: float, depth: int, schedule: str = "linear") -> list[float]:
    """Per-layer shuffle probabilities.

    Args:
        max_rate: probability of the last layer, in [0, 1].
        depth: number of layers (>= 1).
        schedule: ``"linear"``: ``linspace(0, max_rate, depth)`` (the paper's default: layer 0 never
            shuffles, the last layer uses ``max_rate``); ``"constant"``: ``[0] + [max_rate] * (depth - 1)``.

    Returns:
        A list of ``depth`` Python floats.
    """
    max_rate = _check_rate(max_rate, "max_rate")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if schedule == "linear":
        if depth == 1:
            return [0.0]
        # exact endpoints (0 and max_rate), as torch.linspace(0, max_rate, depth) up to float32 rounding
        return [max_rate * i / (depth - 1) for i in range(depth)]
    if schedule == "constant":
        return [0.0] + [max_rate] * (depth - 1)
    raise ValueError(f"unknown SLWS schedule {schedule!r}; expected one of {SCHEDULES}")


def _check_positions(keep_positions: Sequence[int] | None) -> tuple[int, ...] | None:
    if keep_positions is None:
        return None
    if isinstance(keep_positions, int):
        keep_positions = (keep_positions,)
    try:
        positions = tuple(int(p) for p in keep_positions)
    except (TypeError, ValueError):
        raise TypeError(f"keep_positions must be a sequence of ints, got {keep_positions!r}") from None
    return positions or None


class ShuffledLayer(nn.Module):
    """Base class for a layer that applies SLWS around (part of) its forward.

    Subclasses call :meth:`shuffled_call` in ``forward``. It permutes dim 1 of every positional tensor
    argument shaped ``[B, N, ...]`` (``B, N`` taken from the first argument; ``None`` and other
    arguments pass through unchanged), calls the function, and restores the order of every output
    tensor shaped ``[B, N, ...]`` (a tensor, or a tuple / list of them). Keyword arguments are passed
    through unchanged. Nothing happens in eval mode or at rate 0.

    Random draws (the Bernoulli decision and the permutation) come from ``generator`` when given,
    else from the global CPU RNG; they are made on the generator's device and the small index tensor
    is moved to the tokens' device, so a CUDA model needs no host-device sync for the decision.

    Args:
        rate: shuffle probability of this layer, in [0, 1].
        per_sample: draw one decision and one permutation per sample instead of one for the batch
            (the paper shares both across the batch).
        keep_positions: token indices that are never moved (e.g. a class token); negative indices
            count from the end. The paper permutes the whole sequence.
        generator: a ``torch.Generator`` for reproducible draws. Do not combine with gradient
            checkpointing around this layer (the recomputation would draw again); our Vim blocks
            checkpoint inside the shuffle, so this applies only to external checkpointing.
    """

    def __init__(
        self,
        *,
        rate: float = 0.0,
        per_sample: bool = False,
        keep_positions: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.configure_slws(rate, per_sample=per_sample, keep_positions=keep_positions, generator=generator)

    def configure_slws(
        self,
        rate: float,
        *,
        per_sample: bool | None = None,
        keep_positions: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Set the rate (and, when given, the options) of this layer in place."""
        self.slws_rate = _check_rate(rate)
        if per_sample is not None or not hasattr(self, "slws_per_sample"):
            self.slws_per_sample = bool(per_sample)
        if keep_positions is not None or not hasattr(self, "slws_keep_positions"):
            self.slws_keep_positions = _check_positions(keep_positions)
        if generator is not None or not hasattr(self, "slws_generator"):
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            self.slws_generator = generator

    @property
    def slws_active(self) -> bool:
        return self.training and self.slws_rate > 0.0

    # -- draws -----------------------------------------------------------------------------------
    def _draw_device(self) -> torch.device:
        return self.slws_generator.device if self.slws_generator is not None else torch.device("cpu")

    def _draw_perm(self, batch: int, n: int) -> Tensor | None:
        """Returns None (no shuffle), a (N,) permutation, or a (B, N) per-sample permutation."""
        gen, dev = self.slws_generator, self._draw_device()
        keep = self.slws_keep_positions
        if keep is not None:
            if any(not -n <= p < n for p in keep):
                raise ValueError(f"keep_positions {keep} out of range for a sequence of {n} tokens")
            kept = torch.zeros(n, dtype=torch.bool)
            kept[[p % n for p in keep]] = True
            movable = torch.nonzero(~kept).flatten().to(dev)  # (M,) positions allowed to move
        else:
            movable = None
        if not self.slws_per_sample:
            if torch.rand((), generator=gen, device=dev).item() >= self.slws_rate:
                return None
            if movable is None:
                return torch.randperm(n, generator=gen, device=dev)
            perm = torch.arange(n, device=dev)
            perm[movable] = movable[torch.randperm(movable.numel(), generator=gen, device=dev)]
            return perm
        # per sample: own decision and own permutation; non-shuffled rows get the identity
        do = torch.rand(batch, generator=gen, device=dev) < self.slws_rate  # (B,)
        if not bool(do.any()):
            return None
        m = n if movable is None else movable.numel()
        order = torch.rand(batch, m, generator=gen, device=dev).argsort(dim=1)  # (B, M) random perms
        ident = torch.arange(m, device=dev).expand(batch, m)
        order = torch.where(do[:, None], order, ident)
        if movable is None:
            return order
        perm = torch.arange(n, device=dev).repeat(batch, 1)  # (B, N)
        perm[:, movable] = movable[order]
        return perm

    # -- shuffle / restore -----------------------------------------------------------------------
    @staticmethod
    def _permute(x: Tensor, perm: Tensor) -> Tensor:
        """x: (B, N, ...); perm: (N,) or (B, N) -> x[:, perm] (per row for a (B, N) perm)."""
        if perm.dim() == 1:
            return x.index_select(1, perm)
        idx = perm.view(*perm.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return torch.gather(x, 1, idx)

    def shuffled_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with SLWS applied when training (see the class docstring)."""
        if not self.slws_active or not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
            return fn(*args, **kwargs)
        b, n = args[0].shape[:2]
        perm = self._draw_perm(b, n)
        if perm is None:
            return fn(*args, **kwargs)
        perm = perm.to(args[0].device, non_blocking=True)
        inv = perm.argsort(dim=-1)  # the inverse permutation

        def is_tokens(t: Any) -> bool:
            return isinstance(t, Tensor) and t.dim() >= 2 and t.shape[0] == b and t.shape[1] == n

        args = tuple(self._permute(a, perm) if is_tokens(a) else a for a in args)
        out = fn(*args, **kwargs)
        if is_tokens(out):
            return self._permute(out, inv)
        if isinstance(out, (tuple, list)):
            restored = [self._permute(o, inv) if is_tokens(o) else o for o in out]
            return type(out)(restored) if isinstance(out, list) else tuple(restored)
        return out

    def extra_repr(self) -> str:
        s = f"rate={self.slws_rate:g}"
        if self.slws_per_sample:
            s += ", per_sample=True"
        if self.slws_keep_positions is not None:
            s += f", keep_positions={list(self.slws_keep_positions)}"
        return s


class LayerShuffle(ShuffledLayer):
    """Wraps ``module`` with SLWS: ``module`` sees shuffled tokens, the caller sees the original order.

    ``module``'s first positional argument must be a token tensor ``[B, N, ...]``. The wrapper adds no
    parameters and is transparent in ``state_dict`` (keys are the wrapped module's, without ``module.``).

    Args:
        module: the layer to wrap.
        rate: shuffle probability in training mode, in [0, 1].
        per_sample, keep_positions, generator: see :class:`ShuffledLayer`.

    Example:
        >>> blk = LayerShuffle(nn.Linear(8, 8), rate=0.5)
        >>> y = blk(torch.randn(2, 10, 8))   # (2, 10, 8), in the input's token order
    """

    def __init__(
        self,
        module: nn.Module,
        rate: float,
        *,
        per_sample: bool = False,
        keep_positions: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"LayerShuffle wraps an nn.Module, got {type(module).__name__}")
        super().__init__(rate=rate, per_sample=per_sample, keep_positions=keep_positions, generator=generator)
        self.module = module
        self._register_state_dict_hook(_strip_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.shuffled_call(self.module, *args, **kwargs)


def _strip_module_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: ``{prefix}module.x`` -> ``{prefix}x`` (keeps the wrapped module's key names)."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_module_prefix(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """load pre-hook: ``{prefix}x`` -> ``{prefix}module.x``; keys already under ``module.`` are kept."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def apply_slws(
    blocks: nn.ModuleList | nn.Sequential,
    max_rate: float,
    schedule: str = "linear",
    **options: Any,
) -> list[float]:
    """Put SLWS on every block of ``blocks`` in place and return the per-block rates.

    Blocks that already are :class:`ShuffledLayer` (our Vim blocks, or a previous ``LayerShuffle``)
    are reconfigured, so calling this twice never shuffles twice. Other blocks are wrapped in a
    :class:`LayerShuffle`.

    Args:
        blocks: an ``nn.ModuleList`` or ``nn.Sequential`` (e.g. ``vit.blocks``, ``vim.layers``).
        max_rate: rate of the last block, in [0, 1].
        schedule: ``"linear"`` or ``"constant"`` (see :func:`shuffle_rates`).
        **options: ``per_sample``, ``keep_positions``, ``generator`` (see :class:`ShuffledLayer`).

    Example:
        >>> vit = timm.create_model("vit_small_patch16_224")
        >>> rates = apply_slws(vit.blocks, max_rate=0.5)
    """
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"apply_slws expects an nn.ModuleList or nn.Sequential, got {type(blocks).__name__}")
    unknown = set(options) - {"per_sample", "keep_positions", "generator"}
    if unknown:
        raise TypeError(f"apply_slws got unknown option(s) {sorted(unknown)}")
    rates = shuffle_rates(max_rate, len(blocks), schedule)
    for i, (name, blk) in enumerate(list(blocks.named_children())):
        if isinstance(blk, ShuffledLayer):
            blk.configure_slws(rates[i], **options)
        else:
            blocks._modules[name] = LayerShuffle(blk, rates[i], **options)
    return rates
