"""Selective-scan problems to time (inputs, the bytes a fused kernel must move) and a sequential timer.

Used by the benchmark suite, the GPU check and ``benchmarks/bench_scan.py``::

    from shufflemamba.bench.report import scan_markdown
    from shufflemamba.bench.scan import SCAN_SHAPES, bench_scan
    rows = bench_scan([SCAN_SHAPES["vim_tiny"]], impls=("unbind", "cpu"), threads=2)
    print(scan_markdown(rows))

Each implementation runs forward + backward (all inputs require grad, mamba_ssm options on:
D, z, delta_bias, softplus) on the same inputs; the reported time is the median over repeats.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.selective_scan import selective_scan

__all__ = ["SCAN_SHAPES", "ScanShape", "bench_scan", "min_scan_bytes", "mixer_like_inputs", "plain_inputs",
           "scan_unbind_loop"]


@dataclass(frozen=True)
class ScanShape:
    """One scan problem: u is (batch, E, L), A is (E, N)."""

    name: str
    batch: int
    E: int
    L: int
    N: int = 16


# 224 px, patch 16: 196 patches + class token. E = 2 * embed dim.
SCAN_SHAPES = {
    "vim_tiny": ScanShape("vim_tiny", batch=32, E=384, L=197),  # the target shape
    "vim_small": ScanShape("vim_small", batch=32, E=768, L=197),
}

DEFAULT_IMPLS = ("unbind", "ref", "torch", "cpu")


def scan_unbind_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    """The plain baseline: a Python loop over ``unbind``-ed time steps, differentiated by autograd."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, E, N)
    ys = []
    for d_t, u_t, B_t, C_t in zip(delta.unbind(2), u.unbind(2), B.unbind(2), C.unbind(2)):
        h = torch.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * B_t[:, None, :]
        ys.append((h * C_t[:, None, :]).sum(-1))  # (batch, E)
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None]
    return y * F.silu(z) if z is not None else y


def plain_inputs(shape: ScanShape, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """The eight scan arguments for ``shape`` in positional order, Vim's A init, unit-scale activations."""
    g = torch.Generator().manual_seed(seed)
    b, E, L, N = shape.batch, shape.E, shape.L, shape.N

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1).to(dtype)  # Vim's init: -(1..N)
    return [r(b, E, L), r(b, E, L, scale=0.5), A, r(b, N, L), r(b, N, L), r(E), r(b, E, L), r(E, scale=0.5) - 4.0]


def mixer_like_inputs(batch: int, E: int, L: int, N: int, device: torch.device, dtype: torch.dtype,
                      seed: int = 0) -> dict[str, Tensor]:
    """Inputs scaled like a Vim mixer's, as leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(E, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    t = dict(
        u=rnd(batch, E, L), delta=0.5 * rnd(batch, E, L),
        A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1),
        B=rnd(batch, N, L), C=rnd(batch, N, L), D=torch.ones(E), z=rnd(batch, E, L),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )
    act = ("u", "delta", "B", "C", "z")
    return {k: v.to(device, dtype if k in act else torch.float32).requires_grad_() for k, v in t.items()}


def min_scan_bytes(batch: int, E: int, L: int, N: int, elem: int) -> int:
    """Bytes a fused forward+backward must move at least: 4 (batch, E, L) tensors forward (u, delta, z
    read, out written), 7 backward (u, delta, z, grad read; du, ddelta, dz written), B and C read
    twice and dB, dC written once. Parameters are small and left out, and so are the Triton kernel's
    fp32 chunk states (one (E, N) state per 16 steps, written forward and read backward: about one
    more (batch, E, L) fp32 tensor each way), which a kernel that kept every state on chip would not
    need: the figure is the minimum any fused kernel must move."""
    return elem * (11 * batch * E * L + 6 * batch * N * L)


def _time_once(fn, leaves: list[Tensor], gout: Tensor, backward: bool) -> float:
    for t in leaves:
        t.grad = None
    t0 = time.perf_counter()
    if backward:
        fn(*leaves).backward(gout)
    else:
        with torch.no_grad():
            fn(*leaves)
    return time.perf_counter() - t0


def bench_scan(
    shapes: Sequence[ScanShape] = tuple(SCAN_SHAPES.values()),
    impls: Sequence[str] = DEFAULT_IMPLS,
    threads: int | None = 2,
    repeat: int = 5,
    warmup: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict]:
    """Time forward and forward+backward of each implementation on each shape.

    Args:
        shapes: problems to run.
        impls: "unbind" (baseline loop), or any ``impl`` of :func:`selective_scan`.
        threads: torch (and kernel) thread count for the run; None keeps the current one.
        repeat: timed repetitions; the median is reported (and the min, to judge noise).
        warmup: untimed repetitions first (the compiled kernel builds on its first call).
        dtype: input dtype.
        seed: input seed.

    Returns:
        One dict per (shape, impl): shape fields, impl, fwd_ms, fwd_bwd_ms, fwd_bwd_min_ms,
        speedup (fwd+bwd time of "unbind" / this one, when "unbind" ran on that shape).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[dict] = []
    try:
        for shape in shapes:
            leaves = [t.requires_grad_() for t in plain_inputs(shape, dtype, seed)]
            gout = torch.randn(shape.batch, shape.E, shape.L, generator=torch.Generator().manual_seed(seed + 1))
            gout = gout.to(dtype)
            base = None
            for impl in impls:
                if impl == "unbind":
                    fn = lambda *a: scan_unbind_loop(*a, delta_softplus=True)  # noqa: E731
                else:
                    fn = lambda *a, _impl=impl: selective_scan(*a, delta_softplus=True, impl=_impl)  # noqa: E731
                for _ in range(warmup):
                    _time_once(fn, leaves, gout, backward=True)
                fwd = [_time_once(fn, leaves, gout, backward=False) for _ in range(repeat)]
                both = [_time_once(fn, leaves, gout, backward=True) for _ in range(repeat)]
                row = {
                    **asdict(shape),
                    "shape": shape.name,
                    "impl": impl,
                    "dtype": str(dtype).replace("torch.", ""),
                    "threads": torch.get_num_threads(),
                    "fwd_ms": 1e3 * statistics.median(fwd),
                    "fwd_bwd_ms": 1e3 * statistics.median(both),
                    "fwd_bwd_min_ms": 1e3 * min(both),
                }
                if impl == "unbind":
                    base = row["fwd_bwd_ms"]
                row["speedup"] = base / row["fwd_bwd_ms"] if base else None
                rows.append(row)
    finally:
        torch.set_num_threads(old_threads)
    return rows
