"""Triton selective scan: fused forward and backward kernels for the GPU.

Same semantics and argument order as :func:`shufflemamba.ops.selective_scan.selective_scan_ref`::

    u, delta, z: (batch, E, L)   A: (E, N)   B, C: (batch, N, L)   D, delta_bias: (E,)

Design (one program per (batch row, block of ``BLOCK_E`` channels), looping over L):

* Forward: the state ``h`` (BLOCK_E, N) lives in registers in fp32. delta_bias + softplus, the D skip
  and the silu(z) gate are fused; only the output (batch, E, L) is written. When gradients are needed
  it also writes the state at the start of every chunk of ``CHUNK`` steps: (batch, L/CHUNK, E, N).
* Backward: runs the chunks in reverse. For each chunk it first re-runs the forward from the saved
  state, writing h_{t-1} for the chunk's steps into a small per-program scratch (CHUNK, BLOCK_E, N),
  then walks the chunk backwards with dh_t = gy_t * C_t + exp(delta_{t+1} A) dh_{t+1}. Nothing of
  size (batch, E, L, N) is ever materialised. Reductions over E (dB, dC) and over batch (dA, dD,
  ddelta_bias) are written as per-program partials and summed with torch afterwards: deterministic,
  and it needs no atomics (which the interpreter handles poorly).

Triton is optional: this module imports without it, and :func:`triton_available` says whether the
kernels can run. With ``TRITON_INTERPRET=1`` set before triton is first imported, the same kernel
source runs in Triton's interpreter on CPU tensors: that is how the tests check the kernels on
machines without a GPU. Otherwise the kernels are compiled and need CUDA tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_scan_inputs

try:  # optional dependency
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["selective_scan_triton", "triton_available"]

_LOG2E = 1.4426950408889634
_CHUNK = 16  # steps between saved states; also the backward's scratch length


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run.

    Args:
        device: where the tensors will live. ``None`` asks whether they can run anywhere here (a CUDA
            device, or Triton's CPU interpreter); "cuda" asks for compiled kernels on a GPU; "cpu"
            asks for the interpreter (correct but slow: meant for tests), which triton only offers when
            ``TRITON_INTERPRET=1`` was set before triton was first imported.
    """
    if not _HAS_TRITON:
        return False
    if device is None:
        return torch.cuda.is_available() or _interpreter_mode()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu":
        return _interpreter_mode()
    return False


def _interpreter_mode() -> bool:
    """Whether triton's language library was imported for the interpreter (TRITON_INTERPRET=1)."""
    if not _HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    # tl.zeros is itself a triton.jit function: its type says which mode triton's import chose
    return isinstance(tl.zeros, InterpretedFunction)


def _jit(fn):
    """``fn`` wrapped like ``@triton.jit`` would, in the mode triton was imported in.

    Triton fixes interpreter-or-compiler when its own library is imported (``TRITON_INTERPRET``), and
    a kernel and the device functions it calls must be wrapped alike: both go through here.
    """
    if _interpreter_mode():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


if _HAS_TRITON:

    def _step_delta(d_ptrs, mask_e, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """One time step's delta, in fp32: returns (x, dlt) with x = delta_t (+ bias) and
        dlt = softplus(x) (or x without SOFTPLUS). The backward needs x for softplus' derivative."""
        x = tl.load(d_ptrs, mask=mask_e, other=0.0).to(tl.float32)  # (BLOCK_E,)
        if HAS_BIAS:
            x = x + bias
        if SOFTPLUS:
            # softplus with log1p accuracy (Kahan's trick), linear above 20 like torch
            ex = tl.exp(tl.minimum(x, 20.0))
            w = 1.0 + ex
            lp = tl.where(w == 1.0, ex, tl.log(w) * ex / (w - 1.0))
            dlt = tl.where(x > 20.0, x, lp)
        else:
            dlt = x
        return x, dlt

    # a device function: wrapped now (triton, imported above, has fixed its mode), so that it
    # exists under this name when the kernels that call it are compiled
    _step_delta = _jit(_step_delta)

    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ckpt_ptr,
        s_u_b, s_u_e, s_u_l,
        s_d_b, s_d_e, s_d_l,
        s_z_b, s_z_e, s_z_l,
        s_B_b, s_B_n, s_B_l,
        s_C_b, s_C_n, s_C_l,
        s_A_e, s_A_n,
        E, L, N, NCHUNK,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_CKPT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_e = tl.program_id(1)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
        offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_e = offs_e < E
        mask_n = offs_n < N
        mask_en = mask_e[:, None] & mask_n[None, :]

        # A scaled by log2(e) so the decay is one exp2 per element; masked lanes get A=0 (decay 1)
        A = tl.load(A_ptr + offs_e[:, None] * s_A_e + offs_n[None, :] * s_A_n, mask=mask_en, other=0.0)
        A2 = A.to(tl.float32) * 1.4426950408889634  # (BLOCK_E, BLOCK_N)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        bias = 0.0  # unused without HAS_BIAS, but _step_delta takes it
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)

        u_row = u_ptr + pid_b * s_u_b + offs_e * s_u_e
        d_row = delta_ptr + pid_b * s_d_b + offs_e * s_d_e
        z_row = z_ptr + pid_b * s_z_b + offs_e * s_z_e
        B_row = B_ptr + pid_b * s_B_b + offs_n * s_B_n
        C_row = C_ptr + pid_b * s_C_b + offs_n * s_C_n
        out_row = out_ptr + pid_b * E * L + offs_e * L
        ck_tile = ckpt_ptr + pid_b * NCHUNK * E * N + offs_e[:, None] * N + offs_n[None, :]

        h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        for c in range(0, NCHUNK):
            if SAVE_CKPT:
                tl.store(ck_tile + c * E * N, h, mask=mask_en)
            t0 = c * CHUNK
            t1 = tl.minimum(t0 + CHUNK, L)
            for t in range(t0, t1):
                u = tl.load(u_row + t * s_u_l, mask=mask_e, other=0.0).to(tl.float32)
                x, dlt = _step_delta(d_row + t * s_d_l, mask_e, bias, HAS_BIAS, SOFTPLUS)
                Bt = tl.load(B_row + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)
                Ct = tl.load(C_row + t * s_C_l, mask=mask_n, other=0.0).to(tl.float32)
                dA = tl.exp2(dlt[:, None] * A2)  # (BLOCK_E, BLOCK_N)
                h = dA * h + (dlt * u)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], axis=1)  # (BLOCK_E,)
                if HAS_D:
                    y = y + Dv * u
                if HAS_Z:
                    zt = tl.load(z_row + t * s_z_l, mask=mask_e, other=0.0).to(tl.float32)
                    y = y * zt * tl.sigmoid(zt)
                tl.store(out_row + t, y.to(out_ptr.dtype.element_ty), mask=mask_e)

    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gout_ptr, ckpt_ptr, scratch_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        s_u_b, s_u_e, s_u_l,
        s_d_b, s_d_e, s_d_l,
        s_z_b, s_z_e, s_z_l,
        s_B_b, s_B_n, s_B_l,
        s_C_b, s_C_n, s_C_l,
        s_A_e, s_A_n,
        batch, E, L, N, NCHUNK,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_e = tl.program_id(1)
        n_eblk = tl.num_programs(1)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e = offs_e < E
        mask_n = offs_n < N
        mask_en = mask_e[:, None] & mask_n[None, :]

        A = tl.load(A_ptr + offs_e[:, None] * s_A_e + offs_n[None, :] * s_A_n, mask=mask_en, other=0.0)
        A = A.to(tl.float32)
        A2 = A * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        bias = 0.0  # unused without HAS_BIAS, but _step_delta takes it
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)

        u_row = u_ptr + pid_b * s_u_b + offs_e * s_u_e
        d_row = delta_ptr + pid_b * s_d_b + offs_e * s_d_e
        z_row = z_ptr + pid_b * s_z_b + offs_e * s_z_e
        B_row = B_ptr + pid_b * s_B_b + offs_n * s_B_n
        C_row = C_ptr + pid_b * s_C_b + offs_n * s_C_n
        g_row = gout_ptr + pid_b * E * L + offs_e * L  # gout, du, ddelta, dz: contiguous (batch, E, L)
        du_row = du_ptr + pid_b * E * L + offs_e * L
        dd_row = ddelta_ptr + pid_b * E * L + offs_e * L
        dz_row = dz_ptr + pid_b * E * L + offs_e * L
        # dB, dC partials: (n_eblk, batch, N, L), one slice per E block, summed over blocks on the host
        dB_row = dB_ptr + (pid_e * batch + pid_b) * N * L + offs_n * L
        dC_row = dC_ptr + (pid_e * batch + pid_b) * N * L + offs_n * L
        ck_tile = ckpt_ptr + pid_b * NCHUNK * E * N + offs_e[:, None] * N + offs_n[None, :]
        # this program's scratch: (CHUNK, BLOCK_E, BLOCK_N) of h_{t-1} for the chunk being processed
        sc_tile = (
            scratch_ptr
            + (pid_b * n_eblk + pid_e) * CHUNK * BLOCK_E * BLOCK_N
            + tl.arange(0, BLOCK_E)[:, None] * BLOCK_N
            + offs_n[None, :]
        )

        g = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)  # exp(delta_{t+1} A) * dh_{t+1}
        dA_acc = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for ci in range(0, NCHUNK):
            c = NCHUNK - 1 - ci
            t0 = c * CHUNK
            t1 = tl.minimum(t0 + CHUNK, L)
            # phase 1: replay the chunk from its saved state, keeping h_{t-1} for every step
            h = tl.load(ck_tile + c * E * N, mask=mask_en, other=0.0)
            for t in range(t0, t1):
                tl.store(sc_tile + (t - t0) * BLOCK_E * BLOCK_N, h)
                u = tl.load(u_row + t * s_u_l, mask=mask_e, other=0.0).to(tl.float32)
                x, dlt = _step_delta(d_row + t * s_d_l, mask_e, bias, HAS_BIAS, SOFTPLUS)
                Bt = tl.load(B_row + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)
                h = tl.exp2(dlt[:, None] * A2) * h + (dlt * u)[:, None] * Bt[None, :]
            tl.debug_barrier()
            # phase 2: walk the chunk backwards
            for tt in range(0, t1 - t0):
                t = t1 - 1 - tt
                hp = tl.load(sc_tile + (t - t0) * BLOCK_E * BLOCK_N)  # h_{t-1}
                u = tl.load(u_row + t * s_u_l, mask=mask_e, other=0.0).to(tl.float32)
                x, dlt = _step_delta(d_row + t * s_d_l, mask_e, bias, HAS_BIAS, SOFTPLUS)
                Bt = tl.load(B_row + t * s_B_l, mask=mask_n, other=0.0).to(tl.float32)
                Ct = tl.load(C_row + t * s_C_l, mask=mask_n, other=0.0).to(tl.float32)
                go = tl.load(g_row + t, mask=mask_e, other=0.0).to(tl.float32)
                dA = tl.exp2(dlt[:, None] * A2)
                h = dA * hp + (dlt * u)[:, None] * Bt[None, :]  # h_t
                if HAS_Z:
                    zt = tl.load(z_row + t * s_z_l, mask=mask_e, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zt)
                    y = tl.sum(h * Ct[None, :], axis=1)
                    if HAS_D:
                        y = y + Dv * u
                    tl.store(dz_row + t, (go * y * sz * (1.0 + zt * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                             mask=mask_e)
                    gy = go * zt * sz
                else:
                    gy = go
                # dC_t = sum_e gy * h_t
                tl.store(dC_row + t, tl.sum(gy[:, None] * h, axis=0), mask=mask_n)
                g = g + gy[:, None] * Ct[None, :]  # dh_t
                gBsum = tl.sum(g * Bt[None, :], axis=1)  # (BLOCK_E,)
                gdA = g * hp * dA  # grad through the decay, times the decay
                ddlt = tl.sum(gdA * A, axis=1) + gBsum * u
                dA_acc += gdA * dlt[:, None]
                du = dlt * gBsum
                if HAS_D:
                    du = du + gy * Dv
                    dD_acc += gy * u
                tl.store(dB_row + t, tl.sum(g * (dlt * u)[:, None], axis=0), mask=mask_n)
                if SOFTPLUS:
                    ddlt = tl.where(x > 20.0, ddlt, ddlt * tl.sigmoid(x))
                ddlt = tl.where(mask_e, ddlt, 0.0)
                dbias_acc += ddlt
                tl.store(du_row + t, du.to(du_ptr.dtype.element_ty), mask=mask_e)
                tl.store(dd_row + t, ddlt.to(ddelta_ptr.dtype.element_ty), mask=mask_e)
                g = g * dA
            tl.debug_barrier()
        # per-batch partials (batch, E, N) / (batch, E); summed over batch on the host
        tl.store(dA_ptr + pid_b * E * N + offs_e[:, None] * N + offs_n[None, :], dA_acc, mask=mask_en)
        if HAS_D:
            tl.store(dD_ptr + pid_b * E + offs_e, dD_acc, mask=mask_e)
        if HAS_BIAS:
            tl.store(dbias_ptr + pid_b * E + offs_e, dbias_acc, mask=mask_e)

    _KERNELS: dict[str, object] = {}

    def _kernel(name: str):
        """The kernel ``name``, wrapped once (by :func:`_jit`) on first use."""
        if name not in _KERNELS:
            _KERNELS[name] = _jit({"fwd": _scan_fwd_kernel, "bwd": _scan_bwd_kernel}[name])
        return _KERNELS[name]


def _block_e(E: int, batch: int, interpret: bool) -> int:
    if interpret:
        # the interpreter runs programs one after another: few, wide programs are fastest
        return min(triton.next_power_of_2(E), 64)
    # enough programs to fill the GPU (~132 SMs) while keeping the state tile in registers
    block = 32
    while block > 4 and batch * math.ceil(E / block) < 256:
        block //= 2
    return block


def _strides3(t: Tensor | None, like: Tensor) -> tuple[int, int, int]:
    return tuple((t if t is not None else like).stride())  # type: ignore[return-value]


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, save_ckpt: bool):
    batch, E, L, N = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    interpret = _interpreter_mode()
    block_e = _block_e(E, batch, interpret)
    block_n = triton.next_power_of_2(N)
    nchunk = triton.cdiv(L, _CHUNK)
    out = torch.empty((batch, E, L), device=u.device, dtype=u.dtype)
    # (batch, n_chunks, E, N) fp32 states at chunk starts; a dummy pointer when not needed
    ckpt = (torch.empty((batch, nchunk, E, N), device=u.device, dtype=torch.float32) if save_ckpt
            else out)
    grid = (batch, triton.cdiv(E, block_e))
    _kernel("fwd")[grid](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, out, ckpt,
        *u.stride(), *delta.stride(), *_strides3(z, u), *B.stride(), *C.stride(), *A.stride(),
        E, L, N, nchunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        SAVE_CKPT=save_ckpt, BLOCK_E=block_e, BLOCK_N=block_n, CHUNK=_CHUNK,
    )
    return out, (ckpt if save_ckpt else None)


def _backward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, ckpt: Tensor, gout: Tensor):
    batch, E, L, N = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    interpret = _interpreter_mode()
    block_e = _block_e(E, batch, interpret)
    block_n = triton.next_power_of_2(N)
    nchunk = triton.cdiv(L, _CHUNK)
    n_eblk = triton.cdiv(E, block_e)
    dev, f32 = u.device, torch.float32
    gout = gout.contiguous()
    du = torch.empty((batch, E, L), device=dev, dtype=u.dtype)
    ddelta = torch.empty((batch, E, L), device=dev, dtype=delta.dtype)
    dz = torch.empty((batch, E, L), device=dev, dtype=z.dtype) if z is not None else du
    dB_part = torch.empty((n_eblk, batch, N, L), device=dev, dtype=f32)
    dC_part = torch.empty((n_eblk, batch, N, L), device=dev, dtype=f32)
    dA_part = torch.empty((batch, E, N), device=dev, dtype=f32)
    dD_part = torch.empty((batch, E), device=dev, dtype=f32) if D is not None else dA_part
    dbias_part = torch.empty((batch, E), device=dev, dtype=f32) if delta_bias is not None else dA_part
    scratch = torch.empty((batch, n_eblk, _CHUNK, block_e, block_n), device=dev, dtype=f32)
    _kernel("bwd")[(batch, n_eblk)](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, gout, ckpt, scratch,
        du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
        *u.stride(), *delta.stride(), *_strides3(z, u), *B.stride(), *C.stride(), *A.stride(),
        batch, E, L, N, nchunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        BLOCK_E=block_e, BLOCK_N=block_n, CHUNK=_CHUNK,
    )
    dB = dB_part.sum(0).to(B.dtype)
    dC = dC_part.sum(0).to(C.dtype)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dbias


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        save = any(ctx.needs_input_grad[:8])  # (forward itself runs with grad mode off)
        # the chunk states cost L/CHUNK of a full (batch, E, L, N) history; skip them for inference
        out, ckpt = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_ckpt=save)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        grads = _backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ckpt, gout)
        return (*grads, None)


def selective_scan_triton(
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
    """Selective scan with fused Triton kernels (forward and backward), differentiable.

    Args:
        u: input, (batch, E, L); fp32, fp16 or bf16 (the output has this dtype).
        delta: time steps before bias/softplus, (batch, E, L).
        A: state matrix, (E, N) (negative in Mamba: ``-exp(A_log)``).
        B: input projection, (batch, N, L).
        C: output projection, (batch, N, L).
        D: skip weight, (E,), or None.
        z: gate, (batch, E, L), applied as ``y * silu(z)``, or None.
        delta_bias: added to delta before the softplus, (E,), or None.
        delta_softplus: apply softplus to ``delta (+ delta_bias)``.

    Returns:
        (batch, E, L) tensor in ``u.dtype``. State and accumulation are fp32 whatever the inputs.

    CUDA tensors run the compiled kernels; CPU tensors run in Triton's interpreter when TRITON_INTERPRET=1
    was set before triton was imported (slow; for tests).
    """
    if not _HAS_TRITON:
        raise ImportError("selective_scan_triton needs triton: pip install 'shufflemamba[triton]'")
    check_scan_inputs("selective_scan_triton", u, delta, A, B, C, D, z, delta_bias)
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"selective_scan_triton: unsupported dtype {u.dtype} (use fp32, fp16 or bf16)")
    if u.device.type != "cuda" and not _interpreter_mode():
        raise ValueError(
            f"selective_scan_triton: tensors on {u.device} need a CUDA device, or TRITON_INTERPRET=1 set "
            "before triton is first imported (Triton's CPU interpreter, for tests)"
        )
    if u.shape[2] == 0:
        return u.new_empty(u.shape)
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
