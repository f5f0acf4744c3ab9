"""The Vim block's fused CPU operators: the bidirectional mixer core and RMSNorm (channel-last).

Between ``in_proj`` and ``out_proj`` the mixer runs, per direction, a depthwise conv + SiLU, the
``x_proj`` and ``dt_proj`` linears and the selective scan, then averages the two directions. Left
to autograd, the backward of that graph spends a measurable share of a small model's step on
bookkeeping passes over (batch, L, E) tensors (adding the two directions' gradients of x and z,
concatenating them back into ``in_proj``'s output gradient, the same for ``x_proj``'s split output).
``shufflemamba::bimamba_core`` runs it as one kernel call per direction each way (``sl_fwd`` /
``sl_bwd`` in csrc/mixer_cl.c): forward, the conv + SiLU and ``x_proj`` (per sample, when there are
at least as many samples as threads) then the scan with ``dt_proj`` fused, the first direction's
y + D u written ungated and the second's added before one gate; backward, the scan's, ``x_proj``'s
and the conv's gradients, written straight into one (batch, L, 2E) gradient buffer.
``tests/test_cpu_mixer.py`` and ``tests/test_selective_scan.py`` hold both against the reference.

Each operator has a schema, a fake implementation (``torch.compile`` / ``torch.export``), its backward
as another operator (not differentiable: a second derivative raises) and a FLOP formula. Eager calls
that need gradients run the operator in an ``autograd.Function`` made of its registered
``setup_context`` and backward (:func:`_eager_autograd`); traced code calls the operator itself.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._checks import check_mixer_core_inputs, check_rms_inputs, records_grad
from .cpu_kernels import (XPROJ_FUSED_MAX, FusedConv, conv_silu_fwd_cl, conv_xproj_fwd_cl, dtype_suffix,
                          omp_threads, placeholder, ptr, scan_bwd_cl, scan_fwd_cl, unit_stride_rows)
from .cpu_library import library
from .cpu_scan import scan_flops

__all__ = ["DirectionParams", "add_rms_norm_cpu", "bimamba_core_cl", "rms_norm_cpu"]


class DirectionParams(NamedTuple):
    """One scan direction's parameters, as the mixer holds them."""

    conv_weight: Tensor  # (E, 1, K)
    conv_bias: Tensor | None  # (E,)
    x_proj_weight: Tensor  # (R + 2N, E)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,)
    A_log: Tensor  # (E, N): A = -exp(A_log) is formed inside, in A_log's dtype (float32 for a float64 call
    # is allowed: the mixer's reference path forms A in float32)
    D: Tensor  # (E,)


class DirectionActs(NamedTuple):
    """What one direction's forward keeps for its backward."""

    xc: Tensor  # (batch, L, E): silu(conv(x)), the scan's u and x_proj's input
    x_dbl: Tensor  # (batch, L, R + 2N): x_proj's output [dt | B | C]
    dsave: Tensor  # (batch, L, E): softplus(delta + bias), so the backward skips the softplus; empty unless saved


Directions = tuple[DirectionParams, DirectionParams]  # (forward in time, backward in time)


def _directions(flat: Sequence[Tensor | None]) -> Directions:
    """The operators' flat parameter arguments (the forward direction's seven, then the backward's) by name."""
    n = len(DirectionParams._fields)
    return DirectionParams(*flat[:n]), DirectionParams(*flat[n:2 * n])


def _eager_autograd(op, setup_context, backward) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` running ``op`` with the ``setup_context`` and ``backward`` registered on it,
    for eager calls: it skips torch's Python wrapper of a registered backward, whose argument handling
    (``fill_defaults``, quadratic in the arity) cost ~0.1 ms of the mixer core's ~0.75 ms a block at
    batch 2; the demo's training step went from 0.70x to 0.76x timm's ViT at batch 2 (AVX2 build)."""
    overload = op._opoverload

    def forward(ctx, *args):
        out = overload(*args)
        setup_context(ctx, args, out)
        return out

    return type(f"{op._name}_eager", (torch.autograd.Function,),
                dict(forward=staticmethod(forward), backward=staticmethod(backward)))


def _call(op, eager: type[torch.autograd.Function], save: bool, *args):
    """``op(*args)``, through ``eager`` (its :func:`_eager_autograd`) when it is an eager call that records
    gradients (``save``)."""
    if save and not torch.compiler.is_compiling():
        return eager.apply(*args)
    return op._opoverload(*args)


# --- the mixer core: shufflemamba::bimamba_core --------------------------------------------------


def _decay(A_log: Tensor, dtype: torch.dtype) -> Tensor:
    """A = -exp(A_log), (E, N), formed in A_log's dtype and passed in the call's (dA_log = dA A)."""
    return torch.exp(A_log).neg_().to(dtype)


def _rowmajor_xz(xz: Tensor) -> Tensor:
    """xz with unit stride along channels and rows of equal stride (slices of a wider tensor pass)."""
    xz = unit_stride_rows(xz)
    return xz if xz.stride(0) == xz.shape[1] * xz.stride(1) else xz.contiguous()


def _contiguous(p: DirectionParams) -> DirectionParams:
    """The parameters as the kernels read them, each in its module's layout (they transpose what they need)."""
    return DirectionParams(*(None if t is None else t.contiguous() for t in p))


def _core_forward(xz: Tensor, R: int, dirs: Directions, save: bool) -> tuple[Tensor, tuple[DirectionActs, ...]]:
    """y = (y_f + y_b) / 2 and each direction's activations for the backward."""
    xz = _rowmajor_xz(xz)
    batch, L, E2 = xz.shape
    E = E2 // 2
    x, z = xz[..., :E], xz[..., E:]  # (batch, L, E) strided views, unit stride along E
    y = xz.new_empty(batch, L, E)
    # the conv and x_proj inside the scan kernel run a sample on one thread: only with a sample per thread
    fuse = batch >= torch.get_num_threads() and max(p.x_proj_weight.shape[0] for p in dirs) <= XPROJ_FUSED_MAX
    acts = []
    for k, p in enumerate(map(_contiguous, dirs)):
        N = p.A_log.shape[1]
        fused = {}
        if fuse:  # the kernel writes xc = silu(conv(x)) and x_dbl = xc x_proj^T itself, per sample
            xc, x_dbl = xz.new_empty(batch, L, E), xz.new_empty(batch, L, R + 2 * N)
            fused = dict(conv=FusedConv(x, p.conv_weight, p.conv_bias), x_proj_weight=p.x_proj_weight, x_dbl=x_dbl)
        elif p.x_proj_weight.shape[0] <= XPROJ_FUSED_MAX:  # the conv and x_proj over chunks of steps, all threads
            xc, x_dbl = conv_xproj_fwd_cl(x, p.conv_weight, p.conv_bias, k == 1, p.x_proj_weight)
        else:
            xc = conv_silu_fwd_cl(x, p.conv_weight, p.conv_bias, k == 1)
            x_dbl = torch.mm(xc.view(-1, E), p.x_proj_weight.t()).view(batch, L, -1)  # (batch, L, R + 2N)
        dsave = torch.empty_like(xc) if save else placeholder(xz)
        # y = silu(z) (y_f + y_b) / 2 with no extra pass: the first direction's y_f + D u goes into y
        # ungated, the second adds its own and gates the sum (one sigmoid and one read of z per element)
        scan_fwd_cl(xc, None, _decay(p.A_log, xz.dtype), x_dbl[..., R:R + N], x_dbl[..., R + N:], p.D,
                    z if k == 1 else None, p.dt_proj_bias, y, dsave if save else None, None, softplus=True,
                    reverse=k == 1, out_scale=0.5 if k == 1 else 1.0, gate_sum=k == 1, dt=x_dbl[..., :R],
                    dt_proj_weight=p.dt_proj_weight, **fused)
        acts.append(DirectionActs(xc, x_dbl, dsave))
    return y, tuple(acts)


def _core_backward(gy: Tensor, xz: Tensor, R: int, dirs: Directions,
                   acts: tuple[DirectionActs, DirectionActs]) -> tuple[Tensor, Directions]:
    """dxz and each direction's parameter gradients (a conv bias's: empty without one)."""
    xz = _rowmajor_xz(xz)
    E = xz.shape[-1] // 2
    x, z = xz[..., :E], xz[..., E:]
    gy = gy.contiguous()  # read by both directions' kernels
    dxz = xz.new_empty(xz.shape)  # dx in [..., :E], dz in [..., E:]: the first direction writes, the second adds
    dx, dz = dxz[..., :E], dxz[..., E:]
    grads = []
    for k, (p, a) in enumerate(zip(map(_contiguous, dirs), acts)):
        N = p.A_log.shape[1]
        A = _decay(p.A_log, xz.dtype)
        # x_proj's backward runs in the kernel (its input gradient added into the scan's du, its weight
        # gradient reduced with the others), then the conv's (du stays in the kernel, dx gets x's)
        g = scan_bwd_cl(a.xc, a.dsave, None, A, a.x_dbl[..., R:R + N], a.x_dbl[..., R + N:], p.D, z, gy, None, None,
                        dz, dz_accumulate=k == 1, softplus=True, reverse=k == 1, out_scale=0.5, dt=a.x_dbl[..., :R],
                        dt_proj_weight=p.dt_proj_weight, x_proj_weight=p.x_proj_weight,
                        conv=FusedConv(x, p.conv_weight, p.conv_bias, dx, k == 1))
        grads.append(DirectionParams(
            conv_weight=g.dconv_weight, conv_bias=g.dconv_bias if g.dconv_bias is not None else placeholder(xz),
            x_proj_weight=g.dx_proj_weight, dt_proj_weight=g.ddt_proj_weight, dt_proj_bias=g.dbias,
            A_log=g.dA.to(p.A_log.dtype).mul_(A.to(p.A_log.dtype)), D=g.dD,
        ))
    return dxz, (grads[0], grads[1])


_T7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # a schema needs each return spelled out
_T15 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
             Tensor, Tensor]


@torch.library.custom_op("shufflemamba::bimamba_core", mutates_args=(), device_types="cpu")
def _core(xz: Tensor, dt_rank: int,
          conv_weight: Tensor, conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor,
          dt_proj_bias: Tensor, A_log: Tensor, D: Tensor,
          conv_weight_b: Tensor, conv_bias_b: Optional[Tensor], x_proj_weight_b: Tensor, dt_proj_weight_b: Tensor,
          dt_proj_bias_b: Tensor, A_log_b: Tensor, D_b: Tensor, save: bool) -> _T7:
    """(y, then DirectionActs of the forward direction and of the backward direction)."""
    fwd = DirectionParams(conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    bwd = DirectionParams(conv_weight_b, conv_bias_b, x_proj_weight_b, dt_proj_weight_b, dt_proj_bias_b, A_log_b, D_b)
    y, (acts_f, acts_b) = _core_forward(xz, dt_rank, (fwd, bwd), save)
    return y, *acts_f, *acts_b


@_core.register_fake
def _(xz, dt_rank, *params_and_save):
    *params, save = params_and_save
    batch, L, E2 = xz.shape
    out = [xz.new_empty(batch, L, E2 // 2)]
    for p in _directions(params):
        x_dbl = xz.new_empty(batch, L, dt_rank + 2 * p.A_log.shape[1])
        out += DirectionActs(out[0].new_empty(out[0].shape), x_dbl,
                             out[0].new_empty(out[0].shape) if save else placeholder(xz))
    return tuple(out)


@torch.library.custom_op("shufflemamba::bimamba_core_backward", mutates_args=(), device_types="cpu")
def _core_bwd(gy: Tensor, xz: Tensor, dt_rank: int,
              conv_weight: Tensor, conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor,
              dt_proj_bias: Tensor, A_log: Tensor, D: Tensor,
              conv_weight_b: Tensor, conv_bias_b: Optional[Tensor], x_proj_weight_b: Tensor, dt_proj_weight_b: Tensor,
              dt_proj_bias_b: Tensor, A_log_b: Tensor, D_b: Tensor,
              xc: Tensor, x_dbl: Tensor, dsave: Tensor, xc_b: Tensor, x_dbl_b: Tensor, dsave_b: Tensor
              ) -> _T15:
    """(dxz, then the gradients of the forward direction's DirectionParams fields, then the backward's)."""
    fwd = DirectionParams(conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    bwd = DirectionParams(conv_weight_b, conv_bias_b, x_proj_weight_b, dt_proj_weight_b, dt_proj_bias_b, A_log_b, D_b)
    acts = (DirectionActs(xc, x_dbl, dsave), DirectionActs(xc_b, x_dbl_b, dsave_b))
    dxz, (grads_f, grads_b) = _core_backward(gy, xz, dt_rank, (fwd, bwd), acts)
    return dxz, *grads_f, *grads_b


@_core_bwd.register_fake
def _(gy, xz, dt_rank, *params_and_acts):
    out = [xz.new_empty(xz.shape)]
    for p in _directions(params_and_acts):
        out += DirectionParams(*(placeholder(xz) if t is None else t.new_empty(t.shape) for t in p))
    return tuple(out)


def _core_setup(ctx, inputs, output):
    xz, dt_rank, *params, _save = inputs
    ctx.dt_rank = dt_rank
    ctx.has_conv_bias = tuple(p.conv_bias is not None for p in _directions(params))
    ctx.save_for_backward(xz, *params, *output[1:])  # the activations: both directions' DirectionActs
    ctx.set_materialize_grads(False)


def _core_autograd(ctx, gy, *_acts):
    if gy is None:  # the output was not used
        return (None,) * 17
    xz, *params_and_acts = ctx.saved_tensors
    dxz, *flat = torch.ops.shufflemamba.bimamba_core_backward(gy, xz, ctx.dt_rank, *params_and_acts)
    grads = [g._replace(conv_bias=g.conv_bias if has else None)
             for g, has in zip(_directions(flat), ctx.has_conv_bias)]
    return dxz, None, *grads[0], *grads[1], None


_core.register_autograd(_core_autograd, setup_context=_core_setup)
_CoreEager = _eager_autograd(_core, _core_setup, _core_autograd)


def bimamba_core_cl(xz: Tensor, dt_rank: int, forward: DirectionParams, backward: DirectionParams) -> Tensor:
    """``(y_f + y_b) / 2`` of Vim's bidirectional mixer from ``in_proj``'s output, channel-last, CPU.

    Args:
        xz: (batch, L, 2E) float32 / float64, ``in_proj``'s output (x in the first half, z the gate).
        dt_rank: R, the width of the dt slice of ``x_proj``'s output ([dt | B | C]).
        forward, backward: each direction's :class:`DirectionParams`; ``backward`` runs in reverse
            time (anti-causal conv, scan from the end), equal to the flipped computation flipped back.

    Returns:
        (batch, L, E) contiguous: the input of ``out_proj``.
    """
    check_mixer_core_inputs("bimamba_core_cl", xz, dt_rank, dict(forward=forward, backward=backward))
    save = records_grad(xz, *forward, *backward)
    return _call(_core, _CoreEager, save, xz, int(dt_rank), *forward, *backward, save)[0]


def _core_flops(xz, dt_rank, params) -> int:
    batch, L, E2 = xz
    E = E2 // 2
    total = 0
    for conv_weight, A_log in ((params[0], params[5]), (params[7], params[12])):
        N, K = A_log[1], conv_weight[-1]
        # conv, x_proj and dt_proj as multiply-adds (2 FLOPs), then the scan with D and the gate
        total += 2 * batch * L * E * (K + dt_rank + 2 * N + dt_rank) + scan_flops(batch, L, E, N)
    return total


@register_flop_formula(torch.ops.shufflemamba.bimamba_core)
def _(xz, dt_rank, *params, out_shape=None, **kwargs) -> int:
    return _core_flops(xz, dt_rank, params)


@register_flop_formula(torch.ops.shufflemamba.bimamba_core_backward)
def _(gy, xz, dt_rank, *params, out_shape=None, **kwargs) -> int:
    return 2 * _core_flops(xz, dt_rank, params)  # the convention of the matmul formulas: backward = 2 forward


# --- RMSNorm: shufflemamba::rms_norm, shufflemamba::add_rms_norm ---------------------------------
# One kernel pass each way instead of autograd's ~12 elementwise and reduction ops. With a residual
# the block's add comes first, in the same pass: (norm(x + res), x + res), and the backward adds the
# gradient reaching x + res from the next block to the norm's own in that pass too.


def _rms_forward(x: Tensor, res: Tensor | None, weight: Tensor, eps: float, save: bool) -> tuple[Tensor, ...]:
    x, weight = x.contiguous(), weight.contiguous()
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    xsum = None if res is None else torch.empty_like(x2)
    rstd = x2.new_empty(rows) if save else None
    res = None if res is None else res.contiguous()
    getattr(library(), f"rms_fwd_{dtype_suffix(x2)}")(ptr(x2), ptr(res), ptr(xsum), ptr(weight), ptr(y), ptr(rstd),
                                                      rows, D, float(eps), omp_threads(rows * D))
    rstd = rstd if rstd is not None else placeholder(x)
    return (y.view(x.shape), rstd) if xsum is None else (y.view(x.shape), xsum.view(x.shape), rstd)


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@torch.library.custom_op("shufflemamba::rms_norm", mutates_args=(), device_types="cpu")
def _rms(x: Tensor, weight: Tensor, eps: float, save: bool) -> tuple[Tensor, Tensor]:
    """(norm(x), 1 / rms per row for the backward; empty unless save)."""
    return _rms_forward(x, None, weight, eps, save)


@_rms.register_fake
def _(x, weight, eps, save):
    return x.new_empty(x.shape), (x.new_empty(_rows(x)) if save else placeholder(x))


@torch.library.custom_op("shufflemamba::add_rms_norm", mutates_args=(), device_types="cpu")
def _add_rms(x: Tensor, res: Tensor, weight: Tensor, eps: float, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(norm(x + res), x + res, 1 / rms per row for the backward; empty unless save)."""
    return _rms_forward(x, res, weight, eps, save)


@_add_rms.register_fake
def _(x, res, weight, eps, save):
    return x.new_empty(x.shape), x.new_empty(x.shape), (x.new_empty(_rows(x)) if save else placeholder(x))


@torch.library.custom_op("shufflemamba::rms_norm_backward", mutates_args=(), device_types="cpu")
def _rms_bwd(gy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, gsum: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(gx, gweight) of norm(x); ``gsum``, the gradient reaching x from elsewhere, is added to gx."""
    D = x.shape[-1]
    x2, weight = x.reshape(-1, D).contiguous(), weight.contiguous()
    rows = x2.shape[0]
    gy2 = gy.reshape(rows, D).contiguous()
    gadd = None if gsum is None else gsum.reshape(rows, D).contiguous()
    gx, gw = torch.empty_like(x2), torch.empty_like(weight)
    nthreads = omp_threads(rows * D)
    nchunk = max(1, min(rows, 4 * nthreads))  # a few chunks per thread; their partial sums added in the kernel
    rc = getattr(library(), f"rms_bwd_{dtype_suffix(x2)}")(ptr(x2), ptr(weight), ptr(rstd), ptr(gy2), ptr(gadd),
                                                   ptr(gx), ptr(gw), rows, D, nchunk, nthreads)
    if rc != 0:
        raise MemoryError("rms_norm kernel: out of memory")
    return gx.view(x.shape), gw


@_rms_bwd.register_fake
def _(gy, x, weight, rstd, gsum):
    return x.new_empty(x.shape), x.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x, weight, output[1])
    ctx.set_materialize_grads(False)


def _rms_autograd(ctx, gy, _grstd):
    if gy is None:  # the output was not used
        return None, None, None, None
    x, weight, rstd = ctx.saved_tensors
    gx, gw = torch.ops.shufflemamba.rms_norm_backward(gy, x, weight, rstd, None)
    return gx, gw, None, None


def _add_rms_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])  # x + res, weight, rstd
    ctx.set_materialize_grads(False)


def _add_rms_autograd(ctx, gy, gsum, _grstd):
    xsum, weight, rstd = ctx.saved_tensors
    if gy is None:  # only x + res was used (or neither): its gradient passes to both inputs
        return gsum, gsum, None, None, None
    gx, gw = torch.ops.shufflemamba.rms_norm_backward(gy, xsum, weight, rstd, gsum)
    return gx, gx, gw, None, None


_rms.register_autograd(_rms_autograd, setup_context=_rms_setup)
_add_rms.register_autograd(_add_rms_autograd, setup_context=_add_rms_setup)
_RmsEager = _eager_autograd(_rms, _rms_setup, _rms_autograd)
_AddRmsEager = _eager_autograd(_add_rms, _add_rms_setup, _add_rms_autograd)


@register_flop_formula([torch.ops.shufflemamba.rms_norm, torch.ops.shufflemamba.add_rms_norm])
def _(x, *args, out_shape=None, **kwargs) -> int:
    n = 1
    for s in x:
        n *= s
    return 4 * n  # square, sum, scale, weight per element


def rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` with the compiled CPU kernels.

    Args:
        x: (..., D) float32 / float64 on the CPU.
        weight: (D,) of x's dtype.
        eps: added to the mean square.
    """
    check_rms_inputs("rms_norm_cpu", x, weight)
    save = records_grad(x, weight)
    return _call(_rms, _RmsEager, save, x, weight, float(eps), save)[0]


def add_rms_norm_cpu(x: Tensor, res: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + res), x + res)`` in one kernel pass (the Vim block's residual add and norm).

    Args:
        x: (..., D) float32 / float64 on the CPU, the incoming hidden state.
        res: x's shape and dtype, the residual stream.
        weight: (D,) of x's dtype.
        eps: added to the mean square.

    Returns:
        The normalised sum and the sum itself (the new residual), both (..., D) contiguous.
    """
    check_rms_inputs("add_rms_norm_cpu", x, weight, res)
    save = records_grad(x, res, weight)
    y, xsum, _ = _call(_add_rms, _AddRmsEager, save, x, res, weight, float(eps), save)
    return y, xsum

