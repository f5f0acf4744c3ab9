"""The ctypes calls of the compiled CPU kernels (csrc/*.c), one Python function per kernel.

Sequence tensors are (batch, L, C) with unit stride along C and pass as (pointer, batch stride,
time stride), so strided slices of a linear's output go in without a copy. These functions check
only what the C side cannot: the operators in :mod:`~shufflemamba.ops.cpu_scan` and
:mod:`~shufflemamba.ops.cpu_mixer` check their inputs (``_checks.py``) and call them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import config
from .cpu_library import library

XPROJ_FUSED_MAX = 256  # the widest x_proj output (R + 2N) sl_fwd runs x_proj for (SM_XPROJ_MAX in scan_steps.h)


def ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def dtype_suffix(t: Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def unit_stride_rows(t: Tensor) -> Tensor:
    """A (batch, L, C) view with unit stride along C: strided slices pass, anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def omp_threads(work: int) -> int:
    """OpenMP threads for a call over ``work`` elements (called inside the operators only: a
    ``torch.get_num_threads()`` in traced code would break ``torch.compile``'s graph)."""
    return 1 if work < config.PARALLEL_MIN_WORK else torch.get_num_threads()


def _strides(t: Tensor | None) -> tuple[int, int]:
    """(batch, time) strides of a (batch, L, C) tensor, in elements; (0, 0) for None."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def from_placeholder(t: Tensor) -> Tensor | None:
    """An operator's empty placeholder output back to None (a schema cannot return None)."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def placeholder(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --- the ctypes calls ----------------------------------------------------------------------------


def _conv_taps(weight: Tensor, E: int) -> int:
    """K of a depthwise conv weight as the module holds it, (E, 1, K) or (E, K): contiguous, it is (E, K)
    in memory, which the kernels read in place (they transpose it themselves)."""
    if weight.shape[0] != E or weight.numel() % E or not weight.is_contiguous():
        raise ValueError(f"conv weight must be contiguous (E, 1, K) or (E, K) with E = {E}, got "
                         f"{tuple(weight.shape)}")
    return weight.numel() // E


def _check_rows(name: str, t: Tensor | None, E: int) -> None:
    """A weight the kernels read in place as E contiguous rows: A (E, N), dt_proj's weight (E, R)."""
    if t is not None and (t.dim() != 2 or t.shape[0] != E or not t.is_contiguous()):
        raise ValueError(f"{name} must be contiguous ({E}, .), got {tuple(t.shape)}")


def conv_silu_fwd_cl(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool) -> Tensor:
    """The ``cv_fwd`` kernel: ``silu(conv(x) + bias)``, (batch, L, E) contiguous, from x (batch, L, E)
    with unit stride along E and the weight (E, 1, K) contiguous."""
    batch, L, E = x.shape
    out = x.new_empty(batch, L, E)
    rc = getattr(library(), f"cv_fwd_{dtype_suffix(x)}")(
        ptr(x), *_strides(x), ptr(weight), ptr(bias), ptr(out), batch, E, L, _conv_taps(weight, E), int(reverse),
        omp_threads(batch * L * E),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("conv1d kernel: out of memory")
    return out


def conv_xproj_fwd_cl(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool,
                      x_proj_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The ``cx_fwd`` kernel: ``u = silu(conv(x) + bias)`` (batch, L, E) and ``u @ x_proj_weight^T``
    (batch, L, J), both contiguous, over chunks of steps on all threads (for batches smaller than the
    thread count). x: (batch, L, E) with unit stride along E; weight: (E, 1, K) contiguous;
    x_proj_weight: (J, E), J <= 256."""
    batch, L, E = x.shape
    J = x_proj_weight.shape[0]
    u, x_dbl = x.new_empty(batch, L, E), x.new_empty(batch, L, J)
    rc = getattr(library(), f"cx_fwd_{dtype_suffix(x)}")(
        ptr(x), *_strides(x), ptr(weight), ptr(bias), ptr(u), ptr(x_proj_weight), ptr(x_dbl), batch, E, L,
        _conv_taps(weight, E), J, int(reverse), omp_threads(batch * L * E),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("conv + x_proj kernel: out of memory") if rc == 1 else ValueError(f"x_proj too wide: {J}")
    return u, x_dbl


def conv_silu_bwd_cl(x: Tensor, weight: Tensor, bias: Tensor | None, gout: Tensor, dx: Tensor, accumulate: bool,
                     reverse: bool) -> tuple[Tensor, Tensor | None]:
    """The ``cv_bwd`` kernel: writes dx (batch, L, E, unit stride along E), or adds to it with
    ``accumulate``; returns the weight gradient (weight's shape) and the bias gradient (E,), None
    without a bias."""
    batch, L, E = x.shape
    K = _conv_taps(weight, E)
    gout = gout.contiguous()  # held in a local: the kernel reads it after ptr has returned
    dw, db = torch.empty_like(weight), (None if bias is None else torch.empty_like(bias))
    rc = getattr(library(), f"cv_bwd_{dtype_suffix(x)}")(
        ptr(x), *_strides(x), ptr(weight), ptr(bias), ptr(gout), ptr(dx), *_strides(dx),
        int(accumulate), ptr(dw), ptr(db), batch, E, L, K, int(reverse), omp_threads(batch * L * E),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("conv1d kernel: out of memory")
    return dw, db


class FusedConv(NamedTuple):
    """The depthwise conv + SiLU whose output is the scan's u, for :func:`scan_fwd_cl` to run it (with
    x_proj) and :func:`scan_bwd_cl` its backward."""

    x: Tensor  # (batch, L, E) the conv's input, unit stride along E
    weight: Tensor  # (E, 1, K) contiguous, as the module holds it
    bias: Tensor | None  # (E,)
    dx: Tensor | None = None  # (batch, L, E) unit stride along E: x's gradient, written or added to (backward)
    accumulate: bool = False  # add into dx instead of writing it


_NO_DTPROJ = (None, 0, 0, None, 0)  # sl_fwd / sl_bwd's dt_proj arguments when they read delta itself
_NO_CONV_FWD = (None, 0, 0, None, None, 0, None, None)  # sl_fwd's conv and x_proj arguments, unused
_NO_CONV_BWD = (None, 0, 0, None, None, 0, None, 0, 0, 0)  # sl_bwd's conv arguments, unused


def scan_fwd_cl(u: Tensor, delta: Tensor | None, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, out: Tensor, dsave: Tensor | None, ysave: Tensor | None,
                *, softplus: bool, reverse: bool, out_scale: float, gate_sum: bool = False,
                dt: Tensor | None = None, dt_proj_weight: Tensor | None = None,
                conv: FusedConv | None = None, x_proj_weight: Tensor | None = None,
                x_dbl: Tensor | None = None) -> None:
    """The ``sl_fwd`` kernel into ``out``. u contiguous; B, C, z and dt (batch, L, .) with unit last
    stride; A (E, N) contiguous. With ``dt_proj_weight`` (E, R) contiguous the kernel forms
    delta = dt dt_proj_weight^T itself and ``delta`` is not read; ``dsave`` / ``ysave`` (for the backward)
    may be None. With ``gate_sum`` out's values are added
    to y + D u before the gate and the scale (the mixer's second direction, after the first wrote its
    y + D u ungated): out = out_scale * gate(y + D u + out). With ``conv`` (x, weight, bias),
    ``x_proj_weight`` (R + 2N, E) and ``x_dbl`` (batch, L, R + 2N) contiguous, the kernel first computes,
    per sample, u = silu(conv(x)) into ``u`` (an output here) and x_dbl = u x_proj_weight^T, into which
    dt, B and C must be views."""
    batch, L, E = u.shape
    _check_rows("A", A, E)
    _check_rows("dt_proj_weight", dt_proj_weight, E)
    N = A.shape[1]
    R = 0 if dt_proj_weight is None else dt_proj_weight.shape[1]
    dtproj = (ptr(dt), *_strides(dt), ptr(dt_proj_weight), R) if dt_proj_weight is not None else _NO_DTPROJ
    fused = _NO_CONV_FWD
    if conv is not None:
        J = R + 2 * N
        if (dt_proj_weight is None or x_proj_weight is None or x_dbl is None or J > XPROJ_FUSED_MAX
                or x_proj_weight.shape != (J, E)
                or not x_proj_weight.is_contiguous() or x_dbl.shape != (batch, L, J) or not x_dbl.is_contiguous()
                or not u.is_contiguous() or conv.x.shape != u.shape or conv.x.stride(-1) != 1):
            raise ValueError(f"scan_fwd_cl: conv needs dt_proj fused, x_proj_weight (R + 2N, E) and x_dbl "
                             f"(batch, L, R + 2N) contiguous with R + 2N <= {XPROJ_FUSED_MAX}, x shaped as u")
        fused = (ptr(conv.x), *_strides(conv.x), ptr(conv.weight), ptr(conv.bias), _conv_taps(conv.weight, E),
                 ptr(x_proj_weight), ptr(x_dbl))
    rc = getattr(library(), f"sl_fwd_{dtype_suffix(u)}")(
        ptr(u), ptr(delta), ptr(A), ptr(B), *_strides(B), ptr(C), *_strides(C), ptr(D), ptr(z), *_strides(z),
        ptr(delta_bias), ptr(out), ptr(dsave), ptr(ysave), batch, E, L, N, int(softplus), int(reverse),
        float(out_scale), 2 if gate_sum else 0, *dtproj, *fused, omp_threads(batch * L * E * N),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")


class ScanGrads(NamedTuple):
    """What :func:`scan_bwd_cl` returns besides the tensors it writes; each parameter's gradient in
    that parameter's layout (partial sums already reduced)."""

    dA: Tensor  # (E, N)
    dB: Tensor | None  # (batch, L, N); None when x_proj's backward ran in the kernel
    dC: Tensor | None  # (batch, L, N); as dB
    dD: Tensor  # (E,)
    dbias: Tensor  # (E,): the delta bias gradient, the sum of ddelta over batch and time
    ddt: Tensor | None  # (batch, L, R) with dt_proj fused, else None
    ddt_proj_weight: Tensor | None  # (E, R) with dt_proj fused, else None
    dx_proj_weight: Tensor | None = None  # (R + 2N, E), when x_proj's backward ran in the kernel
    dconv_weight: Tensor | None = None  # the conv weight's shape, when the conv's backward ran in the kernel
    dconv_bias: Tensor | None = None  # (E,): likewise, when the conv has a bias


def scan_bwd_cl(u: Tensor, dsave: Tensor, ysave: Tensor | None, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, gout: Tensor, du: Tensor | None, ddelta: Tensor | None, dz: Tensor | None, *,
                dz_accumulate: bool, softplus: bool, reverse: bool, out_scale: float,
                dt: Tensor | None = None, dt_proj_weight: Tensor | None = None, x_proj_weight: Tensor | None = None,
                conv: FusedConv | None = None) -> ScanGrads:
    """The ``sl_bwd`` kernel: writes du and (when given) ddelta, contiguous, and dz (unit last stride;
    added to with ``dz_accumulate``); ``gout`` is the gradient of the forward's ``out_scale * y``.
    With ``dt_proj_weight`` (E, R) the dt_proj gradients come back in :class:`ScanGrads` and ddelta may be
    None. With ``x_proj_weight`` (R + 2N, E) as well (u being x_proj's input, [dt | B | C] its output),
    x_proj's backward runs in the kernel: du includes its input gradient, ``dx_proj_weight`` is its weight
    gradient, and ddt, dB, dC stay inside the kernel (None). With ``conv`` as well (u = silu(conv(conv.x))),
    the conv's backward follows in the kernel: du is then only the kernel's scratch (pass None), conv.dx
    gets x's gradient and ``dconv_weight`` / ``dconv_bias`` come back."""
    batch, L, E = u.shape
    _check_rows("A", A, E)
    _check_rows("dt_proj_weight", dt_proj_weight, E)
    N = A.shape[1]
    gout = gout.contiguous()  # held in a local: the kernel reads it after ptr has returned
    R = 0 if dt_proj_weight is None else dt_proj_weight.shape[1]
    J = R + 2 * N
    if x_proj_weight is not None:
        if dt_proj_weight is None or x_proj_weight.shape != (J, E) or not x_proj_weight.is_contiguous():
            raise ValueError(f"scan_bwd_cl: x_proj_weight must be contiguous (R + 2N, E) = {(J, E)} with dt_proj "
                             f"fused, got {tuple(x_proj_weight.shape)}")
    if conv is not None and (x_proj_weight is None or conv.x.shape != u.shape or conv.dx.shape != u.shape
                             or conv.x.stride(-1) != 1 or conv.dx.stride(-1) != 1):
        raise ValueError("scan_bwd_cl: conv needs x_proj_weight, x and dx shaped as u (unit stride along E)")
    K = 0 if conv is None else _conv_taps(conv.weight, E)
    dA, dD, dbias = u.new_empty(E, N), u.new_empty(E), u.new_empty(E)
    ddtw = None if dt_proj_weight is None else torch.empty_like(dt_proj_weight)
    dxw = None if x_proj_weight is None else torch.empty_like(x_proj_weight)
    dcw = None if conv is None else torch.empty_like(conv.weight)
    dcb = None if conv is None or conv.bias is None else torch.empty_like(conv.bias)
    dtproj = _NO_DTPROJ if dt_proj_weight is None else (ptr(dt), *_strides(dt), ptr(dt_proj_weight), R)
    if x_proj_weight is None:
        dB, dC = u.new_empty(batch, L, N), u.new_empty(batch, L, N)  # zeroed and added to by the kernel
        ddt = u.new_empty(batch, L, R) if dt_proj_weight is not None else None
    else:
        dB = dC = ddt = None
    rc = getattr(library(), f"sl_bwd_{dtype_suffix(u)}")(
        ptr(u), ptr(dsave), ptr(ysave), ptr(A), ptr(B), *_strides(B), ptr(C), *_strides(C), ptr(D),
        ptr(z), *_strides(z), ptr(gout), ptr(du), ptr(ddelta), ptr(dz), *_strides(dz), int(dz_accumulate),
        ptr(dA), ptr(dD), ptr(dbias), ptr(ddtw), ptr(dxw), ptr(dcw), ptr(dcb),
        ptr(dB), ptr(dC), batch, E, L, N, int(softplus), int(reverse),
        float(out_scale), *dtproj, ptr(ddt), ptr(x_proj_weight),
        *(_NO_CONV_BWD if conv is None else (ptr(conv.x), *_strides(conv.x), ptr(conv.weight), ptr(conv.bias), K,
                                             ptr(conv.dx), *_strides(conv.dx), int(conv.accumulate))),
        omp_threads(batch * L * E * N),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")
    return ScanGrads(dA, dB, dC, dD, dbias, ddt, ddtw, dxw, dcw, dcb)
