"""Selective scan (the S6 recurrence of Mamba) with mamba_ssm ``selective_scan_fn`` semantics.

Shapes: u, delta, z: (batch, E, L); A: (E, N); B, C: (batch, N, L); D, delta_bias: (E,).

    delta = softplus(delta + delta_bias)            (bias / softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t
    out   = y * silu(z)                              (gate optional)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Plain PyTorch reference: a loop over time with autograd. Slow, simple, the ground truth."""
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    # (batch, E, L, N): the per-step decay and input; fine for a reference, too big for a fast path
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, E, N)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(2), dBu.unbind(2), C.unbind(2)):
        h = dA_t * h + dBu_t
        ys.append(torch.einsum("ben,bn->be", h, C_t))
    y = torch.stack(ys, dim=2)  # (batch, E, L)
    if D is not None:
        y = y + u * D[:, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


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
    impl: str = "auto",
) -> Tensor:
    """Selective scan; ``impl`` picks the implementation ("auto" picks the fastest available)."""
    # Placeholder dispatcher: the fast CPU and Triton paths plug in here.
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
