"""The compiled CPU selective scan and conv1d + SiLU as PyTorch custom operators.

Two layouts: ``shufflemamba::selective_scan_cpu`` takes mamba_ssm's (batch, E, L) tensors
(csrc/selective_scan.c); the channel-last ``shufflemamba::selective_scan_cl`` and
``shufflemamba::conv1d_silu_cl`` take (batch, L, E) views with unit stride along E, the layout the
Vim mixer's linears produce, and have a ``reverse`` flag equal to ``flip(op(flip(x)))`` along L
without the flips (csrc/mixer_cl.c). Each operator has a schema, a fake implementation (shapes for
``torch.compile`` / ``torch.export`` / meta tensors), its backward as another operator and a FLOP
formula for ``torch.utils.flop_counter``. The kernels' backward is not differentiable: a second
derivative raises. Below the operators, ``scan_fwd_cl`` / ``scan_bwd_cl`` / ``conv_silu_*_cl`` are
the ctypes calls that :mod:`~shufflemamba.ops.cpu_mixer` builds on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import config
from ._checks import check_conv_inputs, check_kernel_dtypes, check_scan_inputs
from .cpu_library import (choice_path, cpu_scan_available, describe_vector_width, library, load_variant,
                          swap_library, vector_width_info, write_choice)

__all__ = ["causal_conv1d_silu_cl", "cpu_scan_available", "describe_vector_width", "selective_scan_cl",
           "selective_scan_cpu", "vector_width_info"]

XPROJ_FUSED_MAX = 256  # the widest x_proj output (R + 2N) sl_fwd runs x_proj for (SM_XPROJ_MAX in scan_steps.h)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _sfx(t: Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def _rowmajor(t: Tensor) -> Tensor:
    """A (batch, L, C) view with unit stride along C: strided slices pass, anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _threads(work: int) -> int:
    """OpenMP threads for a call over ``work`` elements (called inside the operators only: a
    ``torch.get_num_threads()`` in traced code would break ``torch.compile``'s graph)."""
    return 1 if work < config.PARALLEL_MIN_WORK else torch.get_num_threads()


def _strides(t: Tensor | None) -> tuple[int, int]:
    """(batch, time) strides of a (batch, L, C) tensor, in elements; (0, 0) for None."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _none(t: Tensor) -> Tensor | None:
    """An operator's empty placeholder output back to None (a schema cannot return None)."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --- the ctypes calls ----------------------------------------------------------------------------


def conv_silu_fwd_cl(x: Tensor, wt: Tensor, bias: Tensor | None, reverse: bool) -> Tensor:
    """The ``cv_fwd`` kernel: ``silu(conv(x) + bias)``, (batch, L, E) contiguous, from x (batch, L, E)
    with unit stride along E and the weight as (K, E)."""
    batch, L, E = x.shape
    out = x.new_empty(batch, L, E)
    getattr(library(), f"cv_fwd_{_sfx(x)}")(
        _ptr(x), *_strides(x), _ptr(wt), _ptr(bias), _ptr(out), batch, E, L, wt.shape[0], int(reverse),
        _threads(batch * L * E),
    )  # fmt: skip
    return out


def conv_silu_bwd_cl(x: Tensor, wt: Tensor, bias: Tensor | None, gout: Tensor, dx: Tensor, accumulate: bool,
                     reverse: bool) -> tuple[Tensor, Tensor]:
    """The ``cv_bwd`` kernel: writes dx (batch, L, E, unit stride along E), or adds to it with
    ``accumulate``; returns the weight gradient as (K, E) and the bias gradient (E,)."""
    batch, L, E = x.shape
    K = wt.shape[0]
    gout = gout.contiguous()  # held in a local: the kernel reads it after _ptr has returned
    sums = x.new_empty((K + 1) * E)  # [dw (K, E) | db (E)], reduced over the threads by the kernel
    rc = getattr(library(), f"cv_bwd_{_sfx(x)}")(
        _ptr(x), *_strides(x), _ptr(wt), _ptr(bias), _ptr(gout), _ptr(dx), *_strides(dx),
        int(accumulate), _ptr(sums), batch, E, L, K, int(reverse), _threads(batch * L * E),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("conv1d kernel: out of memory")
    return sums[:K * E].view(K, E), sums[K * E:]


class FusedConv(NamedTuple):
    """The depthwise conv + SiLU whose output is the scan's u, for :func:`scan_fwd_cl` to run it (with
    x_proj) and :func:`scan_bwd_cl` its backward."""

    x: Tensor  # (batch, L, E) the conv's input, unit stride along E
    wt: Tensor  # (K, E) its weight, transposed
    bias: Tensor | None  # (E,)
    dx: Tensor | None = None  # (batch, L, E) unit stride along E: x's gradient, written or added to (backward)
    accumulate: bool = False  # add into dx instead of writing it


_NO_DTPROJ = (None, 0, 0, None, 0)  # sl_fwd / sl_bwd's dt_proj arguments when they read delta itself
_NO_CONV_FWD = (None, 0, 0, None, None, 0, None, None)  # sl_fwd's conv and x_proj arguments, unused
_NO_CONV_BWD = (None, 0, 0, None, None, 0, None, 0, 0, 0)  # sl_bwd's conv arguments, unused


def scan_fwd_cl(u: Tensor, delta: Tensor | None, At: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, out: Tensor, dsave: Tensor | None, ysave: Tensor | None,
                *, softplus: bool, reverse: bool, out_scale: float, gate_sum: bool = False,
                dt: Tensor | None = None, dtw: Tensor | None = None,
                conv: FusedConv | None = None, x_proj_weight: Tensor | None = None,
                x_dbl: Tensor | None = None) -> None:
    """The ``sl_fwd`` kernel into ``out``. u contiguous; B, C, z and dt (batch, L, .) with unit last
    stride; At (N, E). With ``dtw`` (R, E) the kernel forms delta = dt dtw itself and ``delta`` is not
    read; ``dsave`` / ``ysave`` (for the backward) may be None. With ``gate_sum`` out's values are added
    to y + D u before the gate and the scale (the mixer's second direction, after the first wrote its
    y + D u ungated): out = out_scale * gate(y + D u + out). With ``conv`` (x, wt, bias),
    ``x_proj_weight`` (R + 2N, E) and ``x_dbl`` (batch, L, R + 2N) contiguous, the kernel first computes,
    per sample, u = silu(conv(x)) into ``u`` (an output here) and x_dbl = u x_proj_weight^T, into which
    dt, B and C must be views."""
    batch, L, E = u.shape
    N = At.shape[0]
    dtproj = (_ptr(dt), *_strides(dt), _ptr(dtw), dtw.shape[0]) if dtw is not None else _NO_DTPROJ
    fused = _NO_CONV_FWD
    if conv is not None:
        J = (0 if dtw is None else dtw.shape[0]) + 2 * N
        if (dtw is None or x_proj_weight is None or x_dbl is None or J > XPROJ_FUSED_MAX or x_proj_weight.shape != (J, E)
                or not x_proj_weight.is_contiguous() or x_dbl.shape != (batch, L, J) or not x_dbl.is_contiguous()
                or not u.is_contiguous() or conv.x.shape != u.shape or conv.x.stride(-1) != 1):
            raise ValueError(f"scan_fwd_cl: conv needs dt_proj fused, x_proj_weight (R + 2N, E) and x_dbl "
                             f"(batch, L, R + 2N) contiguous with R + 2N <= {XPROJ_FUSED_MAX}, x shaped as u")
        fused = (_ptr(conv.x), *_strides(conv.x), _ptr(conv.wt), _ptr(conv.bias), conv.wt.shape[0],
                 _ptr(x_proj_weight), _ptr(x_dbl))
    rc = getattr(library(), f"sl_fwd_{_sfx(u)}")(
        _ptr(u), _ptr(delta), _ptr(At), _ptr(B), *_strides(B), _ptr(C), *_strides(C), _ptr(D), _ptr(z), *_strides(z),
        _ptr(delta_bias), _ptr(out), _ptr(dsave), _ptr(ysave), batch, E, L, N, int(softplus), int(reverse),
        float(out_scale), 2 if gate_sum else 0, *dtproj, *fused, _threads(batch * L * E * N),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")


class ScanGrads(NamedTuple):
    """What :func:`scan_bwd_cl` returns besides the tensors it writes (partial sums already reduced)."""

    dA: Tensor  # (E, N)
    dB: Tensor | None  # (batch, L, N); None when x_proj's backward ran in the kernel
    dC: Tensor | None  # (batch, L, N); as dB
    dD: Tensor  # (E,)
    dbias: Tensor  # (E,): the delta bias gradient, the sum of ddelta over batch and time
    ddt: Tensor | None  # (batch, L, R) with dt_proj fused, else None
    ddtw: Tensor | None  # (R, E) with dt_proj fused, else None
    dxw: Tensor | None = None  # (R + 2N, E): x_proj's weight gradient, when its backward ran in the kernel
    dconv_wt: Tensor | None = None  # (K, E): the conv's weight gradient, when its backward ran in the kernel
    dconv_bias: Tensor | None = None  # (E,): the conv's bias gradient, likewise


def scan_bwd_cl(u: Tensor, dsave: Tensor, ysave: Tensor | None, At: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, gout: Tensor, du: Tensor | None, ddelta: Tensor | None, dz: Tensor | None, *,
                dz_accumulate: bool, softplus: bool, reverse: bool, out_scale: float,
                dt: Tensor | None = None, dtw: Tensor | None = None, x_proj_weight: Tensor | None = None,
                conv: FusedConv | None = None) -> ScanGrads:
    """The ``sl_bwd`` kernel: writes du and (when given) ddelta, contiguous, and dz (unit last stride;
    added to with ``dz_accumulate``); ``gout`` is the gradient of the forward's ``out_scale * y``.
    With ``dtw`` the dt_proj gradients come back in :class:`ScanGrads` and ddelta may be None. With
    ``x_proj_weight`` (R + 2N, E) as well (u being x_proj's input, [dt | B | C] its output), x_proj's
    backward runs in the kernel: du includes its input gradient, ``dxw`` is its weight gradient, and
    ddt, dB, dC stay inside the kernel (None). With ``conv`` as well (u = silu(conv(conv.x))), the conv's
    backward follows in the kernel: du is then only the kernel's scratch (pass None), conv.dx gets x's
    gradient and ``dconv_wt`` / ``dconv_bias`` come back."""
    batch, L, E = u.shape
    N = At.shape[0]
    lib = library()
    gout = gout.contiguous()  # held in a local: the kernel reads it after _ptr has returned
    R = 0 if dtw is None else dtw.shape[0]
    J = R + 2 * N
    if x_proj_weight is not None:
        if dtw is None or x_proj_weight.shape != (J, E) or not x_proj_weight.is_contiguous():
            raise ValueError(f"scan_bwd_cl: x_proj_weight must be contiguous (R + 2N, E) = {(J, E)} with dt_proj "
                             f"fused, got {tuple(x_proj_weight.shape)}")
    if conv is not None and (x_proj_weight is None or conv.x.shape != u.shape or conv.dx.shape != u.shape
                             or conv.wt.dim() != 2 or conv.wt.shape[1] != E or conv.x.stride(-1) != 1
                             or conv.dx.stride(-1) != 1):
        raise ValueError("scan_bwd_cl: conv needs x_proj_weight, x and dx shaped as u (unit stride along E) and "
                         "wt (K, E)")
    K = 0 if conv is None else conv.wt.shape[0]
    # [dA (N, E) | dD | dbias | ddtw (R, E) | dxw (J, E) | conv dw (K, E) | conv db (E)], reduced by the kernel
    sizes = [N * E, E, E, R * E, (J if x_proj_weight is not None else 0) * E, K * E, E if conv is not None else 0]
    sums = u.new_empty(sum(sizes))
    dtproj = _NO_DTPROJ if dtw is None else (_ptr(dt), *_strides(dt), _ptr(dtw), R)
    if x_proj_weight is None:
        dB, dC = u.new_empty(batch, L, N), u.new_empty(batch, L, N)  # zeroed and added to by the kernel
        ddt = u.new_empty(batch, L, R) if dtw is not None else None
    else:
        dB = dC = ddt = None
    rc = getattr(lib, f"sl_bwd_{_sfx(u)}")(
        _ptr(u), _ptr(dsave), _ptr(ysave), _ptr(At), _ptr(B), *_strides(B), _ptr(C), *_strides(C), _ptr(D),
        _ptr(z), *_strides(z), _ptr(gout), _ptr(du), _ptr(ddelta), _ptr(dz), *_strides(dz),
        int(dz_accumulate), _ptr(sums), _ptr(dB), _ptr(dC), batch, E, L, N, int(softplus), int(reverse),
        float(out_scale), *dtproj, _ptr(ddt), _ptr(x_proj_weight),
        *(_NO_CONV_BWD if conv is None else (_ptr(conv.x), *_strides(conv.x), _ptr(conv.wt), _ptr(conv.bias), K,
                                             _ptr(conv.dx), *_strides(conv.dx), int(conv.accumulate))),
        _threads(batch * L * E * N),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")
    dA, dD, dbias, ddtw, dxw, dcw, dcb = sums.split(sizes)
    return ScanGrads(dA.view(N, E).t(), dB, dC, dD, dbias, ddt, ddtw.view(R, E) if dtw is not None else None,
                     dxw.view(J, E) if x_proj_weight is not None else None,
                     dcw.view(K, E) if conv is not None else None, dcb if conv is not None else None)


# --- (batch, E, L) scan: shufflemamba::selective_scan_cpu ----------------------------------------


@torch.library.custom_op("shufflemamba::selective_scan_cpu", mutates_args=(), device_types="cpu")
def _scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    batch, E, L = u.shape
    u, delta, A, D, z, delta_bias = map(_contig, (u, delta, A, D, z, delta_bias))
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (batch, L, N): N innermost
    out = torch.empty_like(u)
    rc = getattr(library(), f"ss_fwd_{_sfx(u)}")(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(z), _ptr(delta_bias),
        _ptr(out), batch, E, L, A.shape[1], int(delta_softplus), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")
    return out


@_scan_cpu.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("shufflemamba::selective_scan_cpu_backward", mutates_args=(), device_types="cpu")
def _scan_cpu_backward(gout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du, ddelta, dA, dB, dC, dD, dz, dbias; the last three empty when D, z, delta_bias are None."""
    batch, E, L = u.shape
    N = A.shape[1]
    u, delta, A, D, z, delta_bias = map(_contig, (u, delta, A, D, z, delta_bias))
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
    nthreads = torch.get_num_threads()
    # work items are (E-chunk, batch) pairs: E is split only when the batch alone cannot keep every
    # thread busy, since each extra chunk costs a (batch, L, N) partial dB / dC buffer
    nchunk = 1 if batch >= 2 * nthreads else max(1, min(E, -(-2 * nthreads // max(batch, 1))))
    gout = gout.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    dA_part = u.new_empty(batch, E, N)
    dB_part, dC_part = u.new_empty(nchunk, batch, L, N), u.new_empty(nchunk, batch, L, N)
    dD_part = u.new_empty(batch, E) if D is not None else None
    rc = getattr(library(), f"ss_bwd_{_sfx(u)}")(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(z), _ptr(delta_bias),
        _ptr(gout), _ptr(du), _ptr(ddelta), _ptr(dA_part), _ptr(dB_part), _ptr(dC_part),
        _ptr(dD_part), _ptr(dz), batch, E, L, N, int(delta_softplus), nchunk, nthreads,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")
    dB = dB_part.sum(0).transpose(1, 2).contiguous()  # (batch, N, L)
    dC = dC_part.sum(0).transpose(1, 2).contiguous()
    dD = dD_part.sum(0) if D is not None else _empty(u)
    dbias = ddelta.sum((0, 2)) if delta_bias is not None else _empty(u)  # broadcast over (batch, L)
    return du, ddelta, dA_part.sum(0), dB, dC, dD, (dz if dz is not None else _empty(u)), dbias


@_scan_cpu_backward.register_fake
def _(gout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    e = lambda t, like: _empty(u) if t is None else torch.empty(like.shape, dtype=u.dtype)  # noqa: E731
    full = torch.empty(u.shape, dtype=u.dtype)
    return (full, torch.empty_like(full), torch.empty(A.shape, dtype=u.dtype), torch.empty(B.shape, dtype=u.dtype),
            torch.empty(C.shape, dtype=u.dtype), e(D, D), e(z, u), e(delta_bias, delta_bias))


def _scan_cpu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.delta_softplus = inputs[8]


def _scan_cpu_autograd(ctx, gout):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = torch.ops.shufflemamba.selective_scan_cpu_backward(gout, u, delta, A, B, C, D, z, delta_bias,
                                                               ctx.delta_softplus)
    return (*grads[:5], *(None if t is None else g for t, g in zip((D, z, delta_bias), grads[5:])), None)


_scan_cpu.register_autograd(_scan_cpu_autograd, setup_context=_scan_cpu_setup)


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """Compiled CPU scan. Inputs must already share one float32 or float64 dtype (the dispatcher
    casts); shapes as in :func:`shufflemamba.ops.selective_scan`."""
    return torch.ops.shufflemamba.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))


# --- channel-last scan: shufflemamba::selective_scan_cl ------------------------------------------


@torch.library.custom_op("shufflemamba::selective_scan_cl", mutates_args=(), device_types="cpu")
def _scan_cl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool, out_scale: float, save: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """out_scale * scan, and with ``save`` what the backward reads: d = softplus(delta + bias) (so it
    skips the softplus) and, with a gate, y + D u (so its replay of the states skips the C_t h_t
    sum); empty placeholders otherwise."""
    u, delta = u.contiguous(), delta.contiguous()
    out = torch.empty_like(u)
    dsave = torch.empty_like(u) if save else None
    ysave = torch.empty_like(u) if save and z is not None else None
    scan_fwd_cl(u, delta, A.t().contiguous(), _rowmajor(B), _rowmajor(C), _contig(D),
                None if z is None else _rowmajor(z), _contig(delta_bias), out, dsave, ysave,
                softplus=delta_softplus, reverse=reverse, out_scale=out_scale)
    return out, (dsave if save else _empty(u)), (ysave if ysave is not None else _empty(u))


@_scan_cl.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale, save):
    full = lambda: torch.empty(u.shape, dtype=u.dtype)  # noqa: E731
    return full(), (full() if save else _empty(u)), (full() if save and z is not None else _empty(u))


@torch.library.custom_op("shufflemamba::selective_scan_cl_backward", mutates_args=(), device_types="cpu")
def _scan_cl_backward(gout: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], dsave: Tensor, ysave: Tensor, delta_softplus: bool, reverse: bool,
                      out_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du, ddelta, dA, dB, dC, dD, dz, dbias (dz empty without a gate)."""
    u = u.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    g = scan_bwd_cl(u, dsave, _none(ysave), A.t().contiguous(), _rowmajor(B), _rowmajor(C), _contig(D),
                    None if z is None else _rowmajor(z), gout, du, ddelta, dz, dz_accumulate=False,
                    softplus=delta_softplus, reverse=reverse, out_scale=out_scale)
    return du, ddelta, g.dA.contiguous(), g.dB, g.dC, g.dD.clone(), (dz if dz is not None else _empty(u)), g.dbias.clone()


@_scan_cl_backward.register_fake
def _(gout, u, A, B, C, D, z, dsave, ysave, delta_softplus, reverse, out_scale):
    t = lambda shape: torch.empty(shape, dtype=u.dtype)  # noqa: E731
    E = u.shape[-1]
    return (t(u.shape), t(u.shape), t(A.shape), t(B.shape), t(C.shape), t((E,)),
            t(u.shape) if z is not None else _empty(u), t((E,)))


def _scan_cl_setup(ctx, inputs, output):
    u, _, A, B, C, D, z, delta_bias, softplus, reverse, out_scale, _ = inputs
    ctx.save_for_backward(u, A, B, C, D, z, output[1], output[2])
    ctx.args = (softplus, reverse, out_scale)
    ctx.present = tuple(t is not None for t in (D, z, delta_bias))
    ctx.set_materialize_grads(False)


def _scan_cl_autograd(ctx, gout, _gd, _gy):
    if gout is None:  # the output was not used
        return (None,) * 12
    u, A, B, C, D, z, dsave, ysave = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.shufflemamba.selective_scan_cl_backward(
        gout, u, A, B, C, D, z, dsave, ysave, *ctx.args)
    has_D, has_z, has_bias = ctx.present
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None, None, None, None)


_scan_cl.register_autograd(_scan_cl_autograd, setup_context=_scan_cl_setup)


def selective_scan_cl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                      z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                      reverse: bool = False, out_scale: float = 1.0) -> Tensor:
    """Selective scan on channel-last tensors: u, delta, z (batch, L, E); B, C (batch, L, N).

    Same semantics as :func:`shufflemamba.ops.selective_scan` on the transposed tensors;
    ``reverse=True`` scans from the last step to the first (``flip(scan(flip(.)))`` along L).
    Inputs must share one float32 / float64 dtype; B, C and z may be strided slices with unit
    stride along their last dim.

    Args:
        out_scale: the result is ``out_scale * y`` (scaled in the kernel, no extra pass).

    Returns:
        (batch, L, E) contiguous.
    """
    check_scan_inputs("selective_scan_cl", u, delta, A, B, C, D, z, delta_bias, channel_last=True)
    check_kernel_dtypes("selective_scan_cl", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, z, delta_bias))
    out, _, _ = torch.ops.shufflemamba.selective_scan_cl(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                        bool(reverse), float(out_scale), save)
    return out


# --- channel-last conv1d + SiLU: shufflemamba::conv1d_silu_cl ------------------------------------


def _conv_wt(weight: Tensor, E: int) -> Tensor:
    return weight.reshape(E, -1).t().contiguous()  # (K, E): channels innermost


@torch.library.custom_op("shufflemamba::conv1d_silu_cl", mutates_args=(), device_types="cpu")
def _conv_cl(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool) -> Tensor:
    x = _rowmajor(x)
    return conv_silu_fwd_cl(x, _conv_wt(weight, x.shape[-1]), _contig(bias), reverse)


@_conv_cl.register_fake
def _(x, weight, bias, reverse):
    return torch.empty(x.shape, dtype=x.dtype)


@torch.library.custom_op("shufflemamba::conv1d_silu_cl_backward", mutates_args=(), device_types="cpu")
def _conv_cl_backward(gout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight (weight's shape), dbias (empty without a bias)."""
    x = _rowmajor(x)
    dx = x.new_empty(x.shape)
    dwt, db = conv_silu_bwd_cl(x, _conv_wt(weight, x.shape[-1]), _contig(bias), gout, dx, False, reverse)
    return dx, dwt.t().reshape(weight.shape).contiguous(), (db.clone() if bias is not None else _empty(x))


@_conv_cl_backward.register_fake
def _(gout, x, weight, bias, reverse):
    return (torch.empty(x.shape, dtype=x.dtype), torch.empty(weight.shape, dtype=x.dtype),
            torch.empty(x.shape[-1:], dtype=x.dtype) if bias is not None else _empty(x))


def _conv_cl_setup(ctx, inputs, output):
    x, weight, bias, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.reverse = reverse


def _conv_cl_autograd(ctx, gout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.shufflemamba.conv1d_silu_cl_backward(gout, x, weight, bias, ctx.reverse)
    return dx, dw, (db if bias is not None else None), None


_conv_cl.register_autograd(_conv_cl_autograd, setup_context=_conv_cl_setup)


def causal_conv1d_silu_cl(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool = False) -> Tensor:
    """``silu(conv1d(x))`` of a depthwise causal conv (padding K-1, first L outputs), channel-last.

    Args:
        x: (batch, L, E), float32 or float64, unit stride along E (slices of a wider tensor are fine).
        weight: (E, 1, K) or (E, K), as ``nn.Conv1d(E, E, K, groups=E).weight``.
        bias: (E,) or None.
        reverse: anti-causal, equal to ``flip(f(flip(x)))`` along L.

    Returns:
        (batch, L, E) contiguous.
    """
    check_conv_inputs("causal_conv1d_silu_cl", x, weight, bias)
    return torch.ops.shufflemamba.conv1d_silu_cl(x, weight, bias, bool(reverse))


# --- FLOP formulas (torch.utils.flop_counter.FlopCounterMode) ------------------------------------
# The scan as mamba_ssm counts it: 9 FLOPs per (batch, step, channel, state), plus one per element
# for D and one for the gate; a backward as twice its forward, the convention of the matmul formulas.


def scan_flops(batch: int, L: int, E: int, N: int, has_D: bool = True, has_z: bool = True) -> int:
    return 9 * batch * L * E * N + (batch * L * E if has_D else 0) + (batch * L * E if has_z else 0)


@register_flop_formula(torch.ops.shufflemamba.selective_scan_cpu)
def _(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    batch, E, L = u
    return scan_flops(batch, L, E, A[1], D is not None, z is not None)


@register_flop_formula(torch.ops.shufflemamba.selective_scan_cpu_backward)
def _(gout, u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    batch, E, L = u
    return 2 * scan_flops(batch, L, E, A[1], D is not None, z is not None)


@register_flop_formula(torch.ops.shufflemamba.selective_scan_cl)
def _(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    batch, L, E = u
    return scan_flops(batch, L, E, A[1], D is not None, z is not None)


@register_flop_formula(torch.ops.shufflemamba.selective_scan_cl_backward)
def _(gout, u, A, B, C, D, z, *args, out_shape=None, **kwargs) -> int:
    batch, L, E = u
    return 2 * scan_flops(batch, L, E, A[1], D is not None, z is not None)


@register_flop_formula(torch.ops.shufflemamba.conv1d_silu_cl)
def _(x, weight, *args, out_shape=None, **kwargs) -> int:
    batch, L, E = x
    return 2 * batch * L * weight[0] * (weight[-1] if len(weight) > 1 else 1)  # a multiply-add per tap


@register_flop_formula(torch.ops.shufflemamba.conv1d_silu_cl_backward)
def _(gout, x, weight, *args, out_shape=None, **kwargs) -> int:
    batch, L, E = x
    return 4 * batch * L * weight[0] * (weight[-1] if len(weight) > 1 else 1)


# --- the recorded vector-width choice ------------------------------------------------------------


def measure_vector_width(rounds: int = 5, reps: int = 6) -> dict:
    """Time a float32 forward + backward of the channel-last scan built at 256 and at 512 bits
    (interleaved rounds, median, thread CPU time: waiting for a busy core does not count), and
    record the faster for later processes' ``auto`` (:func:`~shufflemamba.ops.cpu_library.choice_path`)."""
    cc = shutil.which(config.compiler())
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    libs = {w: load_variant(cc, w) for w in ("256", "512")}
    g = torch.Generator().manual_seed(0)
    batch, L, E, N = 4, 64, 192, 16  # small, with a Vim-like channel count and state size
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in
              ((batch, L, E), (batch, L, E), (E, N), (batch, L, N), (batch, L, N), (E,), (batch, L, E), (E,))]
    with torch.no_grad():
        leaves[2].copy_(-torch.rand(E, N, generator=g) - 0.1)
    times: dict[str, list[float]] = {w: [] for w in libs}
    previous = swap_library(libs["256"])
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for w in list(libs) if r % 2 == 0 else list(libs)[::-1]:
                swap_library(libs[w])
                t0 = time.thread_time()
                for _ in range(reps):
                    selective_scan_cl(*leaves, delta_softplus=True).sum().backward()
                if r:
                    times[w].append((time.thread_time() - t0) * 1e3 / reps)
    finally:
        swap_library(previous)
    ms = {w: sorted(ts)[len(ts) // 2] for w, ts in times.items()}
    rec = {"width": int(min(ms, key=ms.get)), "ms": {w: round(t, 4) for w, t in ms.items()}, "cpu": config.cpu_model(),
           "rounds": rounds, "loadavg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_choice(choice_path(cc), rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shufflemamba.ops.cpu_scan",
                                     description="The CPU kernels' vector width, and how it was chosen.")
    parser.add_argument("--measure", action="store_true", help="time both widths on this CPU (AVX-512 only) and "
                        "record the faster for later processes (a quiet machine gives a meaningful record)")
    args = parser.parse_args(argv)
    if args.measure:
        if not (config.is_x86() and config.has_avx512()):
            print("one vector width on this CPU (no AVX-512): nothing to measure")
        else:
            print(measure_vector_width())
    print(describe_vector_width())
    return 0


if __name__ == "__main__":  # python -m shufflemamba.ops.cpu_scan [--measure]
    raise SystemExit(main())
