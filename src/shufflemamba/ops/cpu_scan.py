"""The compiled CPU selective scan and conv1d + SiLU as PyTorch custom operators.

Two layouts: ``shufflemamba::selective_scan_cpu`` takes mamba_ssm's (batch, E, L) tensors
(csrc/selective_scan.c); the channel-last ``shufflemamba::selective_scan_cl`` and
``shufflemamba::conv1d_silu_cl`` take (batch, L, E) views with unit stride along E, the layout the
Vim mixer's linears produce, and have a ``reverse`` flag equal to ``flip(op(flip(x)))`` along L
without the flips (csrc/mixer_cl.c). Each operator has a schema, a fake implementation (shapes for
``torch.compile`` / ``torch.export`` / meta tensors), its backward as another operator and a FLOP
formula for ``torch.utils.flop_counter``. The kernels' backward is not differentiable: a second
derivative raises. The kernels' ctypes calls are in :mod:`~shufflemamba.ops.cpu_kernels`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import config
from ._checks import check_conv_inputs, check_kernel_dtypes, check_scan_inputs, records_grad
from .cpu_kernels import (contig, conv_silu_bwd_cl, conv_silu_fwd_cl, dtype_suffix, from_placeholder,
                          placeholder, ptr, scan_bwd_cl, scan_fwd_cl, unit_stride_rows)
from .cpu_library import (choice_path, cpu_scan_available, describe_vector_width, library, load_variant,
                          swap_library, vector_width_info, write_choice)

__all__ = ["causal_conv1d_silu_cl", "cpu_scan_available", "describe_vector_width", "selective_scan_cl",
           "selective_scan_cpu", "vector_width_info"]

# --- (batch, E, L) scan: shufflemamba::selective_scan_cpu ----------------------------------------


@torch.library.custom_op("shufflemamba::selective_scan_cpu", mutates_args=(), device_types="cpu")
def _scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    batch, E, L = u.shape
    u, delta, A, D, z, delta_bias = map(contig, (u, delta, A, D, z, delta_bias))
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (batch, L, N): N innermost
    out = torch.empty_like(u)
    rc = getattr(library(), f"ss_fwd_{dtype_suffix(u)}")(
        ptr(u), ptr(delta), ptr(A), ptr(Bt), ptr(Ct), ptr(D), ptr(z), ptr(delta_bias),
        ptr(out), batch, E, L, A.shape[1], int(delta_softplus), torch.get_num_threads(),
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
    u, delta, A, D, z, delta_bias = map(contig, (u, delta, A, D, z, delta_bias))
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
    rc = getattr(library(), f"ss_bwd_{dtype_suffix(u)}")(
        ptr(u), ptr(delta), ptr(A), ptr(Bt), ptr(Ct), ptr(D), ptr(z), ptr(delta_bias),
        ptr(gout), ptr(du), ptr(ddelta), ptr(dA_part), ptr(dB_part), ptr(dC_part),
        ptr(dD_part), ptr(dz), batch, E, L, N, int(delta_softplus), nchunk, nthreads,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")
    dB = dB_part.sum(0).transpose(1, 2).contiguous()  # (batch, N, L)
    dC = dC_part.sum(0).transpose(1, 2).contiguous()
    dD = dD_part.sum(0) if D is not None else placeholder(u)
    dbias = ddelta.sum((0, 2)) if delta_bias is not None else placeholder(u)  # broadcast over (batch, L)
    return du, ddelta, dA_part.sum(0), dB, dC, dD, (dz if dz is not None else placeholder(u)), dbias


@_scan_cpu_backward.register_fake
def _(gout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    e = lambda t, like: placeholder(u) if t is None else torch.empty(like.shape, dtype=u.dtype)  # noqa: E731
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
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """Compiled CPU scan. Inputs must already share one float32 or float64 dtype (the dispatcher
    casts); shapes as in :func:`shufflemamba.ops.selective_scan`."""
    check_scan_inputs("selective_scan_cpu", u, delta, A, B, C, D, z, delta_bias)
    check_kernel_dtypes("selective_scan_cpu", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
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
    scan_fwd_cl(u, delta, A.contiguous(), unit_stride_rows(B), unit_stride_rows(C), contig(D),
                None if z is None else unit_stride_rows(z), contig(delta_bias), out, dsave, ysave,
                softplus=delta_softplus, reverse=reverse, out_scale=out_scale)
    return out, (dsave if save else placeholder(u)), (ysave if ysave is not None else placeholder(u))


@_scan_cl.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_scale, save):
    full = lambda: torch.empty(u.shape, dtype=u.dtype)  # noqa: E731
    return full(), (full() if save else placeholder(u)), (full() if save and z is not None else placeholder(u))


@torch.library.custom_op("shufflemamba::selective_scan_cl_backward", mutates_args=(), device_types="cpu")
def _scan_cl_backward(gout: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], dsave: Tensor, ysave: Tensor, delta_softplus: bool, reverse: bool,
                      out_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du, ddelta, dA, dB, dC, dD, dz, dbias (dz empty without a gate)."""
    u = u.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    g = scan_bwd_cl(u, dsave, from_placeholder(ysave), A.contiguous(), unit_stride_rows(B), unit_stride_rows(C),
                    contig(D), None if z is None else unit_stride_rows(z), gout, du, ddelta, dz, dz_accumulate=False,
                    softplus=delta_softplus, reverse=reverse, out_scale=out_scale)
    dz = dz if dz is not None else placeholder(u)
    return du, ddelta, g.dA, g.dB, g.dC, g.dD, dz, g.dbias


@_scan_cl_backward.register_fake
def _(gout, u, A, B, C, D, z, dsave, ysave, delta_softplus, reverse, out_scale):
    t = lambda shape: torch.empty(shape, dtype=u.dtype)  # noqa: E731
    E = u.shape[-1]
    return (t(u.shape), t(u.shape), t(A.shape), t(B.shape), t(C.shape), t((E,)),
            t(u.shape) if z is not None else placeholder(u), t((E,)))


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
    save = records_grad(u, delta, A, B, C, D, z, delta_bias)
    out, _, _ = torch.ops.shufflemamba.selective_scan_cl(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                        bool(reverse), float(out_scale), save)
    return out


# --- channel-last conv1d + SiLU: shufflemamba::conv1d_silu_cl ------------------------------------


@torch.library.custom_op("shufflemamba::conv1d_silu_cl", mutates_args=(), device_types="cpu")
def _conv_cl(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool) -> Tensor:
    x = unit_stride_rows(x)
    return conv_silu_fwd_cl(x, weight.contiguous(), contig(bias), reverse)


@_conv_cl.register_fake
def _(x, weight, bias, reverse):
    return torch.empty(x.shape, dtype=x.dtype)


@torch.library.custom_op("shufflemamba::conv1d_silu_cl_backward", mutates_args=(), device_types="cpu")
def _conv_cl_backward(gout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight (weight's shape), dbias (empty without a bias)."""
    x = unit_stride_rows(x)
    dx = x.new_empty(x.shape)
    dw, db = conv_silu_bwd_cl(x, weight.contiguous(), contig(bias), gout, dx, False, reverse)
    return dx, dw, (db if db is not None else placeholder(x))


@_conv_cl_backward.register_fake
def _(gout, x, weight, bias, reverse):
    return (torch.empty(x.shape, dtype=x.dtype), torch.empty(weight.shape, dtype=x.dtype),
            torch.empty(x.shape[-1:], dtype=x.dtype) if bias is not None else placeholder(x))


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
    try:
        if args.measure and not (config.is_x86() and config.has_avx512()):
            print("one vector width on this CPU (no AVX-512): nothing to measure")
        elif args.measure:
            print(measure_vector_width())
        print(describe_vector_width())
    except config.KernelConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m shufflemamba.ops.cpu_scan [--measure]
    raise SystemExit(main())
