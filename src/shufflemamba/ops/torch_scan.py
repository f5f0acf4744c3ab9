"""Pure-PyTorch selective scan with a hand-written backward: the fallback when no C compiler is
available, and the path for devices without a dedicated kernel.

Why it is faster than an autograd loop: no per-step autograd graph, one fused ``addcmul_`` per
time step in each direction, and everything that is not sequential (exp, input terms, the C
contraction, the gradient reductions) done in batched ops over a chunk of time steps.
Memory: only the state at each chunk boundary is saved for the backward, (chunks, batch, E, N);
the states inside a chunk are recomputed, so no (batch, E, L, N) tensor is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TORCH_SCAN_CHUNK_ELEMENTS

__all__ = ["selective_scan_torch"]


def _chunk_len(batch: int, E: int, L: int, N: int) -> int:
    return max(1, min(L, TORCH_SCAN_CHUNK_ELEMENTS // max(1, batch * E * N)))


def _time_major(x: Tensor) -> Tensor:
    return x.permute(2, 0, 1).contiguous()  # (batch, X, L) -> (L, batch, X)


def _states(h0: Tensor, dA: Tensor, dBu: Tensor) -> Tensor:
    """Run h_t = dA_t * h_{t-1} + dBu_t over dim 0, in place in ``dBu``; returns all h_t."""
    h = h0
    for t in range(dA.shape[0]):
        h = dBu[t].addcmul_(dA[t], h)  # (batch, E, N)
    return dBu


class _TorchScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        batch, E, L = u.shape
        N = A.shape[1]
        x = delta if delta_bias is None else delta + delta_bias[:, None]
        d = F.softplus(x) if delta_softplus else x  # (batch, E, L)
        T = _chunk_len(batch, E, L, N)
        # time-major copies, (L, batch, E) and (L, batch, N), so that every (T, batch, E, N) chunk
        # tensor below is contiguous and each per-step slice is one dense block
        d_t, du_t = _time_major(d), _time_major(d * u)
        B_t, C_t = _time_major(B), _time_major(C)
        h = u.new_zeros(batch, E, N)
        boundaries, ys = [], []
        for c0 in range(0, L, T):
            c1 = min(c0 + T, L)
            boundaries.append(h)
            dA = torch.exp(d_t[c0:c1, :, :, None] * A)  # (T, batch, E, N)
            dBu = du_t[c0:c1, :, :, None] * B_t[c0:c1, :, None, :]  # (T, batch, E, N)
            hs = _states(h, dA, dBu)
            h = hs[-1]
            ys.append(torch.matmul(hs, C_t[c0:c1, :, :, None]).squeeze(-1))  # (T, batch, E)
        y = torch.cat(ys).permute(1, 2, 0).contiguous()  # (batch, E, L)
        if D is not None:
            y = y + u * D[:, None]
        out = y * F.silu(z) if z is not None else y
        ctx.delta_softplus, ctx.T = delta_softplus, T
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(boundaries))
        return out

    @staticmethod
    def backward(ctx, gout):
        # in the inputs' dtype whatever autocast is on where backward runs, as the forward (below)
        with torch.autocast(gout.device.type, enabled=False):
            return _TorchScan._backward(ctx, gout)

    @staticmethod
    def _backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, boundaries = ctx.saved_tensors
        batch, E, L = u.shape
        T = ctx.T
        x = delta if delta_bias is None else delta + delta_bias[:, None]
        d = F.softplus(x) if ctx.delta_softplus else x
        gy = gout * F.silu(z) if z is not None else gout  # dL/dy, (batch, E, L)
        d_t, u_t, gy_t = _time_major(d), _time_major(u), _time_major(gy)
        B_t, C_t = _time_major(B), _time_major(C)
        du_t = d_t * u_t
        ys, dds, dus, dBs, dCs = [], [], [], [], []
        dA = torch.zeros_like(A)
        g_next = a_next = None  # dL/dh and decay of the first step of the chunk after this one
        for k in reversed(range(boundaries.shape[0])):
            c0, c1 = k * T, min(k * T + T, L)
            h0 = boundaries[k]
            dAc = torch.exp(d_t[c0:c1, :, :, None] * A)  # (T, batch, E, N)
            hs = _states(h0, dAc, du_t[c0:c1, :, :, None] * B_t[c0:c1, :, None, :])
            ys.append(torch.matmul(hs, C_t[c0:c1, :, :, None]).squeeze(-1))  # (T, batch, E)
            gyc = gy_t[c0:c1]  # (T, batch, E)
            # dC_t[n] = sum_e gy_t[e] h_t[e, n]
            dCs.append(torch.matmul(gyc[:, :, None, :], hs).squeeze(2))  # (T, batch, N)
            # g_t = gy_t C_t + a_{t+1} g_{t+1}, in place over the chunk from its end
            G = gyc[..., None] * C_t[c0:c1, :, None, :]  # (T, batch, E, N)
            if g_next is not None:
                G[-1].addcmul_(a_next, g_next)
            for t in range(G.shape[0] - 2, -1, -1):
                G[t].addcmul_(dAc[t + 1], G[t + 1])
            g_next, a_next = G[0], dAc[0]
            h_prev = torch.cat([h0[None], hs[:-1]])  # (T, batch, E, N)
            ga = G * h_prev * dAc  # (T, batch, E, N): dL/da_t * a_t
            dc = d_t[c0:c1]
            dA += torch.einsum("tben,tbe->en", ga, dc)
            sgB = torch.matmul(G, B_t[c0:c1, :, :, None]).squeeze(-1)  # sum_n g B_t, (T, batch, E)
            dds.append((ga * A).sum(-1) + u_t[c0:c1] * sgB)  # (T, batch, E)
            dus.append(dc * sgB)
            # dB_t[n] = sum_e g_t[e, n] d_t[e] u_t[e]
            dBs.append(torch.matmul(du_t[c0:c1, :, None, :], G).squeeze(2))  # (T, batch, N)
        def rev(parts: list[Tensor]) -> Tensor:  # chunks were produced last-first; -> (batch, X, L)
            return torch.cat(parts[::-1]).permute(1, 2, 0).contiguous()

        y, ddelta, du, dB, dC = rev(ys), rev(dds), rev(dus), rev(dBs), rev(dCs)
        dD = dz = None
        if D is not None:
            du = du + gy * D[:, None]
            dD = (gy * u).sum((0, 2))
            y = y + u * D[:, None]
        if z is not None:
            s = torch.sigmoid(z)
            dz = gout * y * s * (1 + z * (1 - s))
        if ctx.delta_softplus:
            ddelta = ddelta * torch.sigmoid(x)
        dbias = ddelta.sum((0, 2)) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


def selective_scan_torch(
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
    """Pure-PyTorch scan with a hand-written backward; inputs share one float dtype (the
    dispatcher casts), any device. Shapes as in :func:`shufflemamba.ops.selective_scan`.

    Autocast is off inside: its matmuls would otherwise run in bf16 and round the states' sums."""
    with torch.autocast(u.device.type, enabled=False):
        return _TorchScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
