"""Building blocks of Vision Mamba: RMSNorm, the bidirectional "bimamba v2" mixer and the Vim block.

Parameter names follow the official hustvl/Vim checkpoints, so they load with strict=True.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops import selective_scan
from ..ops.cpu_linear import Linear
from ..slws import ShuffledLayer

__all__ = ["RMSNorm", "BiMambaMixer", "VimBlock", "make_norm", "INITS"]

# model initialisations: official Vim, ShuffleMamba's models_shuffle.py, Mamba's dt init both ways
INITS = ("vim", "shufflemamba", "mamba")


def _cpu_kernels_apply(x: Tensor) -> bool:
    """The compiled channel-last CPU kernels can take x: CPU, float32 / float64, no autocast, built."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    from ..ops.cpu_scan import cpu_scan_available

    return cpu_scan_available()


class RMSNorm(nn.Module):
    """Root-mean-square norm, weight only: ``x / sqrt(mean(x^2) + eps) * weight`` (computed in fp32)."""

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == x.dtype and _cpu_kernels_apply(x):
            from ..ops.cpu_mixer import rms_norm_cpu

            return rms_norm_cpu(x, self.weight, self.eps)  # same fp32 arithmetic, two kernel passes
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def fuses_add(self, x: Tensor, res: Tensor) -> bool:
        """Whether :meth:`add_forward` runs as one kernel pass here (float32 CPU tensors, kernels built)."""
        return (x.dtype == res.dtype == self.weight.dtype == torch.float32 and x.shape == res.shape
                and _cpu_kernels_apply(x))

    def add_forward(self, x: Tensor, res: Tensor) -> tuple[Tensor, Tensor]:
        """``(norm(res + x), res + x)``: the block's residual add and its norm, in one pass over the
        tokens where :meth:`fuses_add` holds (and in the backward, the two gradients of the sum added
        in the same pass), else as two ops."""
        if self.fuses_add(x, res):
            from ..ops.cpu_mixer import add_rms_norm_cpu

            return add_rms_norm_cpu(x, res, self.weight, self.eps)
        s = res + x
        return self(s), s

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``"rms"`` -> :class:`RMSNorm` (Vim); ``"layer"`` -> ``nn.LayerNorm`` (ShuffleMamba-M)."""
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_layer {kind!r}; expected 'rms' or 'layer'")


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer ("bimamba v2" of Vim).

    One shared ``in_proj`` (D -> 2E) gives x and the gate z. Each direction has its own depthwise causal
    conv1d, ``x_proj``, ``dt_proj``, ``A_log`` and ``D``; the backward direction runs on the flipped
    sequence (x and z flipped). Output: ``out_proj((y_fwd + flip(y_bwd)) / 2)``.

    On CPU (float32 / float64, ``scan_impl`` "auto" or "cpu", compiled kernels available) the
    forward takes a channel-last path with the same results: compiled conv1d + SiLU and scan on
    (B, L, E) views of ``in_proj``'s output, both directions in one autograd function whose
    backward writes the kernels' gradients straight into ``in_proj``'s output gradient
    (:func:`shufflemamba.ops.cpu_mixer.bimamba_core_cl`). Elsewhere (CUDA, autocast, other impls) it runs the
    (B, E, L) path. Both run the backward direction in reverse (look-ahead conv, scan from the end)
    rather than on flipped copies. Where mamba_ssm and causal-conv1d import, ``scan_impl`` "auto"
    on CUDA (or "mamba_ssm" anywhere) runs their kernels instead, on flipped copies as official Vim
    does. Under bf16 autocast the activations are bf16 while A, D and the dt bias stay float32 and
    every scan keeps its state in float32; the block keeps the residual in float32.

    Initialisation (``init``, see :data:`INITS`): ``"vim"`` (official Vim) gives ``dt_proj`` Mamba's dt
    initialisation (weight ``U(+-dt_rank^-0.5)``, bias the inverse softplus of dt drawn log-uniform in
    [dt_min, dt_max], floor ``dt_init_floor``) and the backward direction's ``dt_proj_b`` the same
    weight but a zero bias: official Vim builds it as a plain ``nn.Linear`` whose bias its model init
    zeroes (softplus(0) = ln 2: a step about 7-700x the forward direction's). ``"mamba"`` gives both
    directions Mamba's dt initialisation. ``"shufflemamba"`` (ShuffleMamba's ``models_shuffle.py``,
    which runs timm's segmentation init over the whole model) draws every Linear weight here
    (``in_proj``, ``x_proj``, ``dt_proj`` and their ``_b`` twins) trunc-normal std 0.02 and zeroes
    both dt biases. Under every init ``A_log = log(1..N)`` per channel and ``D = 1``; the convs and
    (except under "shufflemamba") ``in_proj`` / ``x_proj`` keep PyTorch's default init; the model
    re-draws ``out_proj.weight`` kaiming-uniform / sqrt(depth).

    Args:
        d_model: token width D.
        d_state: SSM state size N.
        d_conv: causal conv kernel size.
        expand: E = expand * D.
        dt_rank: rank of the dt projection; ``None`` -> ceil(D / 16).
        dt_min, dt_max, dt_init_floor: dt initialisation range.
        init: ``"vim"``, ``"shufflemamba"`` or ``"mamba"`` (see above).
        scan_impl: passed to :func:`shufflemamba.ops.selective_scan` as ``impl``.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        init: Literal["vim", "shufflemamba", "mamba"] = "vim",
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = e = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.scan_impl = scan_impl

        # in_proj / out_proj: nn.Linear whose fp32 CPU products run on oneDNN where it beats torch's BLAS
        self.in_proj = Linear(d_model, 2 * e, bias=False)
        # forward direction
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(e, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, d_state))
        self.D = nn.Parameter(torch.empty(e))
        # backward direction
        self.conv1d_b = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=True)
        self.x_proj_b = nn.Linear(e, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, e, bias=True)
        self.A_b_log = nn.Parameter(torch.empty(e, d_state))
        self.D_b = nn.Parameter(torch.empty(e))

        self.out_proj = Linear(e, d_model, bias=False)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        for p in (self.A_log, self.A_b_log, self.D, self.D_b):
            p._no_weight_decay = True  # the Mamba convention, read by no_weight_decay()
        # the model's generic bias init (zeros) must not undo a Mamba dt initialisation
        self.dt_proj.bias._no_reinit = init != "shufflemamba"
        self.dt_proj_b.bias._no_reinit = init == "mamba"
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """(Re)initialise the projections, dt, A_log and D of both directions as ``self.init`` says."""
        if self.A_log.is_meta:
            return  # shapes only (parameter counting on the meta device)
        dt_min, dt_max, floor = self._dt_init
        std = self.dt_rank**-0.5
        if self.init == "shufflemamba":
            # timm's segmentation init over every Linear (models_shuffle.py); out_proj is the model's
            for lin in (self.in_proj, self.x_proj, self.x_proj_b, self.dt_proj, self.dt_proj_b):
                trunc_normal_(lin.weight, std=0.02)
        for dt_proj, a_log, d in ((self.dt_proj, self.A_log, self.D), (self.dt_proj_b, self.A_b_log, self.D_b)):
            if self.init != "shufflemamba":
                nn.init.uniform_(dt_proj.weight, -std, std)
            if self.init == "shufflemamba" or (dt_proj is self.dt_proj_b and self.init == "vim"):
                dt_proj.bias.zero_()
            else:
                log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
                dt = log_dt.exp().clamp(min=floor)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt
            a = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
            a_log.copy_(a.log())
            d.fill_(1.0)

    def _direction(self, x: Tensor, z: Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
                   a_log: Tensor, d: Tensor, reverse: bool) -> Tensor:
        """One scan direction. x, z: (B, E, L) -> y: (B, E, L).

        ``reverse`` computes the flipped direction in place: the conv looks ahead instead of back
        (cross-correlation with the flipped kernel over a right-padded x) and the scan runs from the
        end, so no flipped copy of x, z or y is made (the Triton scan reads backwards natively).

        With causal-conv1d in use (:meth:`_causal_conv1d`) the conv and its SiLU are its fused
        kernel; it has no look-ahead mode, so the reverse direction then runs on flipped copies, as
        official Vim does.
        """
        conv_fn = self._causal_conv1d(x, conv)
        if conv_fn is not None and reverse:
            return self._direction(x.flip(-1), z.flip(-1), conv, x_proj, dt_proj, a_log, d, False).flip(-1)
        seqlen = x.shape[-1]
        if conv_fn is not None:
            # (dim, width) weight as causal-conv1d takes it; x is L-contiguous already when forward()
            # built xz as official Vim does (a copy only for a flipped or channel-last view)
            x = conv_fn(x if x.stride(-1) == 1 else x.contiguous(), conv.weight.squeeze(1), conv.bias, activation="silu")
        elif reverse:
            x = F.silu(F.conv1d(F.pad(x, (0, conv.kernel_size[0] - 1)), conv.weight.flip(-1), conv.bias,
                                groups=conv.groups))
        else:
            x = F.silu(conv(x)[..., :seqlen])  # causal: padding d_conv-1 then keep the first L outputs
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, E, L); bias added in the scan
        a = -torch.exp(a_log.float())  # (E, N)
        return selective_scan(
            x, delta, a, b.transpose(1, 2), c.transpose(1, 2), d.float(), z,
            delta_bias=dt_proj.bias.float(), delta_softplus=True, impl=self.scan_impl, reverse=reverse,
        )

    def _causal_conv1d(self, x: Tensor, conv: nn.Conv1d) -> Any:
        """causal-conv1d's ``causal_conv1d_fn`` when this direction should use it, else None.

        Used with ``scan_impl="mamba_ssm"`` (the official Vim stack; any device, so CPU tests can
        stand a pure-PyTorch module in for it) or with ``"auto"`` on CUDA, whenever the package
        imports and the kernel width is one it has (2-4). Never imported before that question.
        """
        if self.scan_impl not in ("mamba_ssm", "auto") or not 2 <= conv.kernel_size[0] <= 4:
            return None
        if self.scan_impl == "auto" and (x.device.type != "cuda" or x.dtype == torch.float64):
            return None
        from ..ops.mamba_ssm_glue import causal_conv1d

        return causal_conv1d()

    def _use_fused_cpu(self, hidden: Tensor) -> bool:
        """Channel-last compiled path: CPU, fp32/fp64, scan_impl auto/cpu, kernel built."""
        if self.scan_impl not in ("auto", "cpu") or self.in_proj.weight.dtype != hidden.dtype:
            return False
        return _cpu_kernels_apply(hidden)

    def _params_cl(self, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, a_log: Tensor, d: Tensor,
                   dtype: torch.dtype) -> Any:
        """One direction's parameters for :func:`~shufflemamba.ops.cpu_mixer.bimamba_core_cl`.

        A (from A_log, formed inside the function), D and the dt bias go through float32 as in
        :meth:`_direction` (a no-op for fp32 models), so both paths compute the same numbers for float64
        models too.
        """
        from ..ops.cpu_mixer import DirectionParams

        if dtype == torch.float32 and a_log.dtype == d.dtype == dt_proj.bias.dtype == torch.float32:
            # the common case, without the no-op casts: each is an op dispatch (~2 us) on every call
            return DirectionParams(conv.weight, conv.bias, x_proj.weight, dt_proj.weight, dt_proj.bias, a_log, d)
        return DirectionParams(conv.weight, conv.bias, x_proj.weight, dt_proj.weight,
                               dt_proj.bias.float().to(dtype), a_log.float(), d.float().to(dtype))

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden: (B, L, D) -> (B, L, D)."""
        if self._use_fused_cpu(hidden):
            from ..ops.cpu_mixer import bimamba_core_cl

            xz = self.in_proj(hidden)  # (B, L, 2E): x | z, channel-last, no transpose
            fwd = self._params_cl(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, xz.dtype)
            bwd = self._params_cl(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, xz.dtype)
            y = bimamba_core_cl(xz, self.dt_rank, fwd, bwd)  # (B, L, E) = (y_f + y_b) / 2
            return self.out_proj(y)
        if self._causal_conv1d(hidden, self.conv1d) is not None:
            # mamba_ssm's stack, laid out as official Vim: W @ hidden^T is (B, 2E, L) with L contiguous,
            # so the conv and the scan take x and z as they are instead of copying transposed views
            xz = torch.matmul(self.in_proj.weight, hidden.transpose(1, 2))
        else:
            xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each
        y_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, False)
        y_b = self._direction(x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, True)
        y = (y_f + y_b) / 2  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))


class VimBlock(ShuffledLayer):
    """Add -> Norm -> Mixer, with SLWS built in (this block is a :class:`ShuffledLayer`).

    ``residual = residual + drop_path(hidden)`` (the first block takes the embeddings as residual),
    ``hidden = mixer(norm(residual))``; the residual is kept in fp32. Returns ``(hidden, residual)``.
    When shuffling, both tensors are permuted with the same indices and both outputs restored; since
    add, norm and drop path act per token, only the mixer sees the shuffled order. Gradient
    checkpointing (``grad_checkpointing``) runs inside the shuffle, so the recomputation sees the same
    permutation without re-drawing.

    Args:
        dim: token width D.
        mixer_kwargs: keyword arguments of :class:`BiMambaMixer`.
        norm_layer: ``"rms"`` or ``"layer"``.
        norm_eps: norm epsilon.
        drop_path: drop-path rate applied to the incoming ``hidden`` before the add.
        residual_in_fp32: keep the residual stream in float32.
        slws_rate, slws_per_sample, slws_keep_positions: see :class:`ShuffledLayer`.
    """

    def __init__(
        self,
        dim: int,
        *,
        mixer_kwargs: dict[str, Any] | None = None,
        norm_layer: str = "rms",
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
        residual_in_fp32: bool = True,
        slws_rate: float = 0.0,
        slws_per_sample: bool = False,
        slws_keep_positions: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(rate=slws_rate, per_sample=slws_per_sample, keep_positions=slws_keep_positions)
        self.mixer = BiMambaMixer(dim, **(mixer_kwargs or {}))
        self.norm = make_norm(norm_layer, dim, norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32
        self.grad_checkpointing = False

    def _forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden
        else:
            hidden = self.drop_path(hidden)
            if isinstance(self.norm, RMSNorm) and self.norm.fuses_add(hidden, residual):
                normed, residual = self.norm.add_forward(hidden, residual)  # fp32: one CPU kernel pass
                return self.mixer(normed), residual
            residual = residual + hidden
        if self.residual_in_fp32 and residual.dtype != torch.float32:
            residual = residual.float()
        norm_dtype = self.norm.weight.dtype
        hidden = self.mixer(self.norm(residual if residual.dtype == norm_dtype else residual.to(norm_dtype)))
        return hidden, residual

    def _maybe_checkpointed(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, hidden, residual, use_reentrant=False)
        return self._forward(hidden, residual)

    def forward(self, hidden: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """hidden, residual: (B, L, D) (residual None for the first block) -> (hidden, residual)."""
        return self.shuffled_call(self._maybe_checkpointed, hidden, residual)
