"""The core of the bidirectional Vim mixer as one autograd function on the CPU (channel-last).

Between ``in_proj`` and ``out_proj`` the mixer runs, per direction, a depthwise conv + SiLU, the
``x_proj`` and ``dt_proj`` linears and the selective scan, then averages the two directions. Left
to autograd, the backward of that graph spends a measurable share of a small model's step on
bookkeeping passes over (batch, L, E) tensors: the gradients of x and z from the two directions
are added (``add_``), concatenated back into the gradient of ``in_proj``'s output (``cat`` of a
(batch, L, 2E) tensor per layer), ``x_proj``'s split output is concatenated back the same way, and
the conv output's two gradient paths (the scan's u and ``x_proj``'s input) are added.

:func:`bimamba_core_cl` runs the same computation as one kernel call per direction each way
(``sl_fwd`` / ``sl_bwd`` in ``mixer_cl.c``, per sample): forward, the conv + SiLU, ``x_proj`` and the
scan with ``dt_proj`` fused; backward, the scan's gradients, ``x_proj``'s (its input gradient added
into du, its weight gradient reduced with the others) and the conv's, written straight into one
(batch, L, 2E) gradient buffer (dx in its first half, dz in its second, the second direction adding
to the first). Each fused part has a switch below for A/B timing. Same numbers as the per-op path up
to float summation order; ``tests/test_selective_scan.py`` holds both against the (batch, E, L)
reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_scan import (XPROJ_FUSED_MAX, FusedConv, _contig, _lib_or_raise, _ptr, _rowmajor, _sfx, _threads,
                       conv_silu_bwd_cl, conv_silu_fwd_cl, scan_bwd_cl, scan_fwd_cl)

__all__ = ["DirectionParams", "add_rms_norm_cpu", "bimamba_core_cl", "rms_norm_cpu"]

# Whether the forward saves y + D u (the gate's input) for dz. Off: the backward's replay of the states,
# which it runs anyway, sums C_t h_t again instead (N FMAs per channel and step), so the forward writes
# and the backward reads one (batch, L, E) tensor less per direction; the mixer core is mostly bound by
# memory traffic at the demo's size (docs/benchmarks.md). A switch for A/B comparisons.
SAVE_Y = False

# Whether the first direction writes its y + D u ungated and the second gates the sum (one sigmoid of z
# and one read of z per element, not one per direction). Off: each direction gates its own half, the
# mixer's forward before 927acb1. A switch for A/B comparisons, as SAVE_Y.
GATE_ONCE = True

# Whether x_proj's backward runs inside the scan's backward kernel (sl_bwd given x_proj's weight: its
# input gradient added into du, its weight gradient reduced with the others). Off: the kernel returns
# [ddt | dB | dC] and two matmuls follow, the backward before this switch. A switch for A/B comparisons.
XPROJ_IN_KERNEL = True

# Whether the conv's backward runs inside the scan's backward kernel as well (per sample, du kept in the
# kernel's buffer: no (batch, L, E) du written and read back, one kernel call a direction). Needs
# XPROJ_IN_KERNEL. Off: cv_bwd's own call after it. A switch for A/B comparisons.
CONV_IN_KERNEL = True

# Whether the forward's conv and x_proj run inside the scan's forward kernel (per sample, before its
# scan: one kernel call a direction, no x_proj matmul). Only with at least as many samples as threads:
# a sample's work then runs on one thread. Off: cv_fwd's call and a matmul first. For A/B comparisons.
FWD_IN_KERNEL = True


class DirectionParams(NamedTuple):
    """One scan direction's parameters, as the mixer holds them."""

    conv_weight: Tensor  # (E, 1, K)
    conv_bias: Tensor | None  # (E,)
    x_proj_weight: Tensor  # (R + 2N, E)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,)
    A_log: Tensor  # (E, N): A = -exp(A_log) is formed inside the function, in A_log's dtype (which may be
    # float32 for a float64 call: the mixer's reference path forms A in float32), so autograd records no
    # exp / neg ops of its own per direction and step
    D: Tensor  # (E,)


class _BiMambaCoreCL(torch.autograd.Function):
    """xz (batch, L, 2E) and both directions' parameters -> (y_f + y_b) / 2 (batch, L, E)."""

    @staticmethod
    def forward(ctx, xz, dt_rank: int, *flat):
        batch, L, E2 = xz.shape
        E = E2 // 2
        x, z = xz[..., :E], xz[..., E:]  # (batch, L, E) strided views, unit stride along E
        train = any(ctx.needs_input_grad)
        y = xz.new_empty(batch, L, E)
        saved: list[Tensor | None] = []
        dirs = (DirectionParams(*flat[:7]), DirectionParams(*flat[7:]))
        fuse = (FWD_IN_KERNEL and batch >= torch.get_num_threads()
                and max(p.x_proj_weight.shape[0] for p in dirs) <= XPROJ_FUSED_MAX)
        for k, p in enumerate(dirs):
            reverse = k == 1
            wt = p.conv_weight.reshape(E, -1).t().contiguous()  # (K, E): channels innermost
            bias = _contig(p.conv_bias)
            N = p.A_log.shape[1]
            fused = {}
            if fuse:  # the kernel writes xc = silu(conv(x)) and x_dbl = xc x_proj^T itself, per sample
                xc, x_dbl = xz.new_empty(batch, L, E), xz.new_empty(batch, L, dt_rank + 2 * N)
                fused = dict(conv=FusedConv(x, wt, bias), x_proj_weight=_contig(p.x_proj_weight), x_dbl=x_dbl)
            else:
                xc = conv_silu_fwd_cl(x, wt, bias, reverse)  # (batch, L, E) = silu(conv(x))
                x_dbl = torch.mm(xc.view(-1, E), p.x_proj_weight.t()).view(batch, L, -1)  # (batch, L, R + 2N)
            dt, bm, cm = x_dbl[..., :dt_rank], x_dbl[..., dt_rank:dt_rank + N], x_dbl[..., dt_rank + N:]
            dtw = p.dt_proj_weight.t().contiguous()  # (R, E): the scan forms delta = dt dtw itself
            A = torch.exp(p.A_log).neg_()  # (E, N) in A_log's dtype, kept for dA_log = dA A
            At = A.to(xz.dtype).t().contiguous()  # (N, E)
            dsave = torch.empty_like(xc) if train else None  # softplus(delta + bias), for the backward
            # y + D u before the gate, for dz: recomputed by the backward's replay unless SAVE_Y (one
            # (batch, L, E) tensor less to write, keep and read back; see SAVE_Y)
            ysave = torch.empty_like(xc) if train and SAVE_Y else None
            # y = silu(z) (y_f + y_b) / 2 with no extra pass: the first direction's y_f (+ D u) goes into y
            # ungated, the second adds y_b and gates the sum (GATE_ONCE; else each gates and halves its own)
            first_raw = GATE_ONCE and k == 0
            scan_fwd_cl(xc, None, At, bm, cm, _contig(p.D), None if first_raw else z, _contig(p.dt_proj_bias), y,
                        dsave, ysave, softplus=True, reverse=reverse, out_scale=1.0 if first_raw else 0.5,
                        accumulate=k == 1 and not GATE_ONCE, gate_sum=k == 1 and GATE_ONCE, dt=dt, dtw=dtw, **fused)
            saved += [wt, bias, xc, x_dbl, At, dtw, dsave, ysave, A]
        if train:
            ctx.save_for_backward(xz, *flat, *saved)
        ctx.dt_rank = dt_rank
        return y

    @staticmethod
    @once_differentiable  # a hand-written backward: a second derivative through it raises instead of being wrong
    def backward(ctx, gy):
        xz, *rest = ctx.saved_tensors
        flat, saved = rest[:14], rest[14:]
        nsaved = len(saved) // 2
        batch, L, E2 = xz.shape
        E, R = E2 // 2, ctx.dt_rank
        x, z = xz[..., :E], xz[..., E:]
        gy = gy.contiguous()  # read by both directions' kernels
        dxz = torch.empty_like(xz)  # dx in [..., :E], dz in [..., E:]: both directions write, then add
        dx, dz = dxz[..., :E], dxz[..., E:]
        grads: list[Tensor | None] = []
        for k in range(2):
            p = DirectionParams(*flat[7 * k: 7 * k + 7])
            wt, bias, xc, x_dbl, At, dtw, dsave, ysave, A = saved[nsaved * k: nsaved * (k + 1)]
            N = At.shape[0]
            dt, bm, cm = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
            # the kernel runs x_proj's backward too (XPROJ_IN_KERNEL: du gets its input gradient added, g.dxw
            # is its weight's), and then the conv's (CONV_IN_KERNEL: du stays in the kernel, dx gets x's)
            xw = _contig(p.x_proj_weight) if XPROJ_IN_KERNEL else None
            conv = FusedConv(x, wt, bias, dx, k == 1) if XPROJ_IN_KERNEL and CONV_IN_KERNEL else None
            du = None if conv is not None else torch.empty_like(xc)
            g = scan_bwd_cl(xc, dsave, ysave, At, bm, cm, _contig(p.D), z, gy, du, None, dz, dz_accumulate=k == 1,
                            softplus=True, reverse=k == 1, out_scale=0.5, dt=dt, dtw=dtw, x_proj_weight=xw, conv=conv)
            if xw is not None:
                d_xproj_w = g.dxw
            else:
                dx_dbl = torch.cat((g.ddt, g.dB, g.dC), -1).view(-1, R + 2 * N)  # x_proj's output gradient
                d_xproj_w = torch.mm(dx_dbl.t(), xc.view(-1, E))  # (R + 2N, E)
                du.view(-1, E).addmm_(dx_dbl, p.x_proj_weight)  # the conv output's two gradient paths summed
            if conv is not None:
                dwt, db = g.dconv_wt, g.dconv_bias
            else:
                dwt, db = conv_silu_bwd_cl(x, wt, bias, du, dx, k == 1, k == 1)
            grads += [
                dwt.t().reshape(p.conv_weight.shape), db if p.conv_bias is not None else None,
                d_xproj_w, g.ddtw.t(), g.dbias, g.dA.to(A.dtype) * A, g.dD,  # dA_log = dA A
            ]
        return (dxz, None, *grads)


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
    xz = _rowmajor(xz)
    if xz.dim() != 3 or xz.shape[-1] % 2:
        raise ValueError(f"bimamba_core_cl: xz must be (batch, L, 2E), got {tuple(xz.shape)}")
    if xz.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bimamba_core_cl: float32 or float64 expected, got {xz.dtype}")
    if xz.stride(0) != xz.shape[1] * xz.stride(1):
        xz = xz.contiguous()
    flat = []
    for p in (forward, backward):
        for name, t in zip(p._fields, p):
            if t is not None and t.dtype != xz.dtype and not (name == "A_log" and t.dtype == torch.float32):
                raise TypeError(f"bimamba_core_cl: parameters must be {xz.dtype}, got {t.dtype} for {name}")
        flat += list(p)
    return _BiMambaCoreCL.apply(xz, int(dt_rank), *flat)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm over the last dim in one kernel pass each way, instead of autograd's ~12 elementwise and
    reduction ops, several of them broadcasts over the (rows, 1) scale. With ``res`` the block's
    residual add comes first, in the same pass: returns ``(norm(x + res), x + res)``, and the backward
    adds the gradient reaching ``x + res`` from the next block to the norm's own (autograd would
    add the two in a pass of its own, and the add in another)."""

    @staticmethod
    def forward(ctx, x, res, weight, eps: float):
        lib = _lib_or_raise()
        D = x.shape[-1]
        x2 = x.reshape(-1, D)
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        xsum = None if res is None else torch.empty_like(x2)
        train = any(ctx.needs_input_grad)
        rstd = x2.new_empty(rows) if train else None
        getattr(lib, f"rms_fwd_{_sfx(x2)}")(_ptr(x2), _ptr(res), _ptr(xsum), _ptr(weight), _ptr(y), _ptr(rstd),
                                            rows, D, float(eps), _threads(rows * D))
        if train:
            ctx.save_for_backward(x2 if xsum is None else xsum, weight, rstd)
        ctx.has_res = res is not None
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not a tensor of zeros to add
        if xsum is None:
            return y.view(x.shape)
        return y.view(x.shape), xsum.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gsum=None):
        x2, weight, rstd = ctx.saved_tensors
        rows, D = x2.shape
        if gy is None:  # only x + res was used: its gradient passes to both inputs
            return gsum, gsum, None, None
        gy2 = gy.reshape(rows, D).contiguous()
        gadd = None if gsum is None else gsum.reshape(rows, D).contiguous()
        gx = torch.empty_like(x2)
        gw = torch.empty_like(weight)
        nthreads = _threads(rows * D)
        nchunk = max(1, min(rows, 4 * nthreads))  # a few chunks per thread; their partial sums added in the kernel
        rc = getattr(_lib_or_raise(), f"rms_bwd_{_sfx(x2)}")(_ptr(x2), _ptr(weight), _ptr(rstd), _ptr(gy2), _ptr(gadd),
                                                            _ptr(gx), _ptr(gw), rows, D, nchunk, nthreads)
        if rc != 0:
            raise MemoryError("rms_norm kernel: out of memory")
        gx = gx.view(gy.shape)
        return gx, (gx if ctx.has_res else None), gw, None


def _check_rms(x: Tensor, weight: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise TypeError(f"{name}: x (..., D) and weight (D,) of one float32/float64 dtype expected, got "
                        f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")


def rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` with the compiled CPU kernels.

    Args:
        x: (..., D) float32 / float64 on the CPU (made contiguous if it is not).
        weight: (D,) of x's dtype.
        eps: added to the mean square.
    """
    _check_rms(x, weight, "rms_norm_cpu")
    return _RMSNormCPU.apply(x.contiguous(), None, weight.contiguous(), float(eps))


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
    _check_rms(x, weight, "add_rms_norm_cpu")
    if res.shape != x.shape or res.dtype != x.dtype:
        raise TypeError(f"add_rms_norm_cpu: res must match x, got {tuple(res.shape)} {res.dtype} and "
                        f"{tuple(x.shape)} {x.dtype}")
    return _RMSNormCPU.apply(x.contiguous(), res.contiguous(), weight.contiguous(), float(eps))
