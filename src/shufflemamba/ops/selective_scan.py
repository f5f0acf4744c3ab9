"""Selective scan (the S6 recurrence of Mamba) with mamba_ssm ``selective_scan_fn`` semantics.

Shapes: u, delta, z: (batch, E, L); A: (E, N); B, C: (batch, N, L); D, delta_bias: (E,).

    delta = softplus(delta + delta_bias)            (bias / softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t
    out   = y * silu(z)                              (gate optional)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ._checks import check_scan_inputs
from .scan_reference import selective_scan_ref  # noqa: F401  (the reference beside the dispatcher)


ScanImpl = Literal["auto", "ref", "cpu", "torch", "triton", "mamba_ssm"]
IMPLS: tuple[str, ...] = get_args(ScanImpl)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: half types are computed in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_impl(impl: ScanImpl, device: torch.device, dtype: torch.dtype = torch.float32) -> ScanImpl:
    """The implementation ``impl="auto"`` means for tensors of ``dtype`` on ``device``.

    The rule on CUDA: mamba_ssm's kernel when it imports (and the dtype is one it has: not float64),
    else our Triton kernel, else the pure-PyTorch path. mamba_ssm comes first because it is the
    kernel official Vim trains with, tuned and used for years, while our Triton kernel has so far
    only been compiled and checked for correctness, never timed on a GPU. Swap the order once
    ``make gpu-check`` measures Triton faster on the GPUs we care about. float64 goes to the
    pure-PyTorch path: neither GPU kernel takes it.
    """
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if device.type == "cuda":
        from .mamba_ssm_glue import mamba_ssm_scan

        if dtype == torch.float64:
            return "torch"
        if mamba_ssm_scan() is not None:  # the current CUDA device's trial call
            return "mamba_ssm"
        try:
            from .triton_scan import triton_available
        except ImportError:
            return "torch"
        return "triton" if triton_available(device) else "torch"
    if device.type == "cpu":
        from .cpu_scan import cpu_scan_available

        return "cpu" if cpu_scan_available() else "torch"
    return "torch"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    impl: ScanImpl = "auto",
    reverse: bool = False,
) -> Tensor:
    """Selective scan with mamba_ssm ``selective_scan_fn`` semantics, differentiable in every tensor.

    Args:
        u: Input, (batch, E, L).
        delta: Step sizes before bias / softplus, (batch, E, L).
        A: State matrix (diagonal per channel), (E, N); negative for a stable scan.
        B: Input projection, (batch, N, L).
        C: Output projection, (batch, N, L).
        D: Skip connection, (E,).
        z: Gate, (batch, E, L): the output is multiplied by silu(z).
        delta_bias: Added to delta before the softplus, (E,).
        delta_softplus: Apply softplus to delta (+ bias).
        impl: "auto" (CUDA: "mamba_ssm" if it imports, else "triton" if importable, else "torch";
            CPU: "cpu" if the kernel builds, else "torch"), "cpu" (compiled C kernel), "torch"
            (pure PyTorch, hand-written backward, any device), "triton" (GPU kernel),
            "mamba_ssm" (mamba_ssm's CUDA kernel, when that package is installed; see
            :mod:`shufflemamba.ops.mamba_ssm_glue`), or "ref" (the plain reference).
        reverse: Scan from the sequence's end: the same as flipping u, delta, B, C, z along L, scanning
            and flipping the output back. "triton" does it by reading backwards (no copies); the
            other impls flip.

    Returns:
        Output, (batch, E, L), in u's dtype. float16 / bfloat16 inputs are computed in float32.
    """
    check_scan_inputs("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    impl = resolve_impl(impl, u.device, u.dtype)
    if reverse and impl != "triton":
        flip = lambda t: t if t is None else t.flip(-1)  # noqa: E731
        out = selective_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                             impl=impl)
        return out.flip(-1)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if impl == "ref":
        return selective_scan_ref(*args)
    if impl == "mamba_ssm":
        from .mamba_ssm_glue import selective_scan_mamba

        return selective_scan_mamba(*args)
    if impl == "triton":
        try:
            from .triton_scan import selective_scan_triton, triton_available
        except ImportError as exc:
            raise ImportError(f"selective_scan: impl='triton' needs the triton package ({exc})") from exc
        if not triton_available(u.device):
            raise RuntimeError(
                f"selective_scan: impl='triton' cannot run on {u.device} (needs triton and a CUDA "
                "device, or TRITON_INTERPRET=1 for CPU tests)"
            )
        return selective_scan_triton(*args, reverse=reverse)
    # the fast paths take one float32 / float64 dtype; .to() is differentiable, so gradients
    # come back in each input's own dtype
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    cast = [t if t is None else t.to(dtype) for t in args[:-1]]
    if impl == "cpu":
        if u.device.type != "cpu":
            raise ValueError(f"selective_scan: impl='cpu' needs CPU tensors, got {u.device}")
        from .cpu_scan import cpu_scan_available, selective_scan_cpu

        if not cpu_scan_available():
            raise RuntimeError("selective_scan: impl='cpu' unavailable (the C kernel did not build); use impl='torch'")
        out = selective_scan_cpu(*cast, delta_softplus)
    else:
        from .torch_scan import selective_scan_torch

        out = selective_scan_torch(*cast, delta_softplus)
    return out.to(u.dtype)
