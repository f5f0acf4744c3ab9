"""The Triton programs of the GPU selective scan: the forward and backward kernels and their device
functions. :mod:`shufflemamba.ops.triton_scan` picks their tiles, launches them and wraps them in
autograd; its docstring describes the design.

Triton is optional: without it this module imports with ``HAS_TRITON`` False and defines no kernels.
Triton fixes interpreter-or-compiler when it is first imported (``TRITON_INTERPRET``); every function
here is wrapped in that mode (:func:`_jit`).
"""

from __future__ import annotations

import torch

try:  # optional dependency
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreter_mode", "kernel"]


def interpreter_mode() -> bool:
    """Whether triton's language library was imported for the interpreter (TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
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
    if interpreter_mode():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


if HAS_TRITON:

    def _load_f32_plain(ptrs, mask):
        """A masked tile load (zero where ``mask`` is off) widened to fp32."""
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    def _load_f32_opaque(ptrs, mask):
        """:func:`_load_f32_plain` with the bf16 / fp16 widening in inline PTX, which Triton's layout
        pass cannot move. Triton 3.6 hoists a layout conversion above a plain widening whenever its cost
        model calls it a tie, and then recomputes everything between the load and the conversion in the
        broadcast (BLOCK_T, BLOCK_E) layout that the 3D tiles need: the softplus 16 times per value,
        2.8x the forward's SASS instructions (``python -m shufflemamba.bench.triton_compile``)."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        if x.dtype == tl.bfloat16:  # bf16 is fp32's upper half: place the bits above 16 zero bits
            return tl.inline_asm_elementwise("{ .reg .b16 lo; mov.b16 lo, 0; mov.b32 $0, {lo, $1}; }",
                                             "=r,h", [x], dtype=tl.float32, is_pure=True, pack=1)
        if x.dtype == tl.float16:
            return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return x.to(tl.float32)

    def _load_delta(d_ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """A tile of delta in fp32: returns (x, dlt) with x = delta (+ bias) and dlt = softplus(x)
        (or x without SOFTPLUS), zero where ``mask`` is off. The backward needs x for softplus'
        derivative. ``bias`` broadcasts against the tile (a row of per-channel values)."""
        x = _load_f32(d_ptrs, mask)
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
        # masked steps get delta 0: decay 1 and no input, so the state passes through them unchanged
        return x, tl.where(mask, dlt, 0.0)

    def _affine_combine(a1, b1, a2, b2):
        """Compose two steps of h -> a * h + b: first (a1, b1), then (a2, b2)."""
        return a1 * a2, b1 * a2 + b2

    def _time_index(c, L, BLOCK_T: tl.constexpr, REVERSE: tl.constexpr):
        """Chunk ``c``'s positions in scan order and in memory: (p, t, mask), each (BLOCK_T,).
        With REVERSE the scan runs from the sequence's end, so position p reads time L-1-p."""
        p = c * BLOCK_T + tl.arange(0, BLOCK_T)
        if REVERSE:
            t = L - 1 - p
        else:
            t = p
        return p, t, p < L

    def _row(tile, i, BLOCK_T: tl.constexpr):
        """Row ``i`` of a (BLOCK_T, BLOCK_E, BLOCK_N) tile, as (BLOCK_E, BLOCK_N). A masked sum rather
        than a reduce that keeps one operand: Triton promises no order for a reduction's combines
        (triton#4962), and a sum over a one-hot mask is exact whatever the order."""
        pick = (tl.arange(0, BLOCK_T) == i)[:, None, None]
        return tl.sum(tl.where(pick, tile, 0.0), axis=0)

    # device functions: wrapped now (triton, imported above, has fixed its mode), so that they
    # exist under these names when the kernels that call them are compiled
    # PTX is NVIDIA's: the interpreter and ROCm builds widen with .to (the same values)
    _load_f32 = _jit(_load_f32_plain if interpreter_mode() or torch.version.hip else _load_f32_opaque)
    _load_delta = _jit(_load_delta)
    _affine_combine = _jit(_affine_combine)
    _time_index = _jit(_time_index)
    _row = _jit(_row)

    # Tiles are (time, channel, state) = (BLOCK_T, BLOCK_E, BLOCK_N), time first: Triton then lays the
    # scan axis out along each thread's registers rather than across lanes, so most of the parallel
    # scan is sequential in-thread FMAs instead of warp shuffles (sm_90 forward: 37 instead of 53 SASS
    # instructions per element and step at equal tiles; `python -m shufflemamba.bench.triton_compile`).

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
        REVERSE: tl.constexpr, SAVE_CKPT: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
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
        A2 = A.to(tl.float32)[None, :, :] * 1.4426950408889634  # (1, BLOCK_E, BLOCK_N)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_E)
        bias = 0.0  # unused without HAS_BIAS, but _load_delta takes it
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]

        u_cols = u_ptr + pid_b * s_u_b + offs_e[None, :] * s_u_e  # (1, BLOCK_E)
        d_cols = delta_ptr + pid_b * s_d_b + offs_e[None, :] * s_d_e
        z_cols = z_ptr + pid_b * s_z_b + offs_e[None, :] * s_z_e
        B_cols = B_ptr + pid_b * s_B_b + offs_n[None, :] * s_B_n  # (1, BLOCK_N)
        C_cols = C_ptr + pid_b * s_C_b + offs_n[None, :] * s_C_n
        out_cols = out_ptr + pid_b * E * L + offs_e[None, :] * L
        ck_tile = ckpt_ptr + pid_b * NCHUNK * E * N + offs_e[:, None] * N + offs_n[None, :]

        h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)  # state before this chunk
        for c in range(0, NCHUNK):
            if SAVE_CKPT:
                tl.store(ck_tile + c * E * N, h, mask=mask_en)
            p, t, mask_t = _time_index(c, L, BLOCK_T, REVERSE)
            tt = t[:, None]  # (BLOCK_T, 1)
            m_te = mask_t[:, None] & mask_e[None, :]  # (BLOCK_T, BLOCK_E)
            m_tn = mask_t[:, None] & mask_n[None, :]  # (BLOCK_T, BLOCK_N)
            # whole tiles of the chunk, contiguous along time in memory: coalesced loads
            u = _load_f32(u_cols + tt * s_u_l, m_te)  # (BLOCK_T, BLOCK_E)
            x, dlt = _load_delta(d_cols + tt * s_d_l, m_te, bias, HAS_BIAS, SOFTPLUS)
            Bt = _load_f32(B_cols + tt * s_B_l, m_tn)  # (BLOCK_T, BLOCK_N)
            Ct = _load_f32(C_cols + tt * s_C_l, m_tn)
            # h_t = dA_t * h_{t-1} + dBu_t for every step at once: a parallel scan over the chunk
            dA = tl.exp2(dlt[:, :, None] * A2)  # (BLOCK_T, BLOCK_E, BLOCK_N)
            dBu = (dlt * u)[:, :, None] * Bt[:, None, :]  # (BLOCK_T, BLOCK_E, BLOCK_N)
            cum_a, hs = tl.associative_scan((dA, dBu), axis=0, combine_fn=_affine_combine)
            hs = hs + cum_a * h[None, :, :]  # the states, carried in from the chunk before
            y = tl.sum(hs * Ct[:, None, :], axis=2)  # (BLOCK_T, BLOCK_E)
            if HAS_D:
                y = y + Dv * u
            if HAS_Z:
                zt = _load_f32(z_cols + tt * s_z_l, m_te)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_cols + tt, y.to(out_ptr.dtype.element_ty), mask=m_te)
            # the chunk's last state (padded steps passed it through unchanged); the time axis is
            # in-thread, so this costs no shuffles
            h = _row(hs, BLOCK_T - 1, BLOCK_T)

    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gout_ptr, ckpt_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        s_u_b, s_u_e, s_u_l,
        s_d_b, s_d_e, s_d_l,
        s_z_b, s_z_e, s_z_l,
        s_B_b, s_B_n, s_B_l,
        s_C_b, s_C_n, s_C_l,
        s_A_e, s_A_n,
        batch, E, L, N, NCHUNK,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        REVERSE: tl.constexpr, ATOMIC_DBC: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_e = tl.program_id(1)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e = offs_e < E
        mask_n = offs_n < N
        mask_en = mask_e[:, None] & mask_n[None, :]

        A = tl.load(A_ptr + offs_e[:, None] * s_A_e + offs_n[None, :] * s_A_n, mask=mask_en, other=0.0)
        A = A.to(tl.float32)[None, :, :]  # (1, BLOCK_E, BLOCK_N)
        A2 = A * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        bias = 0.0  # unused without HAS_BIAS, but _load_delta takes it
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]

        u_cols = u_ptr + pid_b * s_u_b + offs_e[None, :] * s_u_e
        d_cols = delta_ptr + pid_b * s_d_b + offs_e[None, :] * s_d_e
        z_cols = z_ptr + pid_b * s_z_b + offs_e[None, :] * s_z_e
        B_cols = B_ptr + pid_b * s_B_b + offs_n[None, :] * s_B_n
        C_cols = C_ptr + pid_b * s_C_b + offs_n[None, :] * s_C_n
        el_cols = pid_b * E * L + offs_e[None, :] * L  # gout, du, ddelta, dz: contiguous (batch, E, L)
        if ATOMIC_DBC:  # dB, dC: (batch, N, L) in fp32, every E block adds its share
            nl_cols = pid_b * N * L + offs_n[None, :] * L
        else:  # partials (n_eblk, batch, N, L), one slice per E block, summed on the host
            nl_cols = (pid_e * batch + pid_b) * N * L + offs_n[None, :] * L
        ck_tile = ckpt_ptr + pid_b * NCHUNK * E * N + offs_e[:, None] * N + offs_n[None, :]

        dh_next = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)  # dh at the next chunk's first step
        dA_acc = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for ci in range(0, NCHUNK):
            c = NCHUNK - 1 - ci
            p, t, mask_t = _time_index(c, L, BLOCK_T, REVERSE)
            tt = t[:, None]
            m_te = mask_t[:, None] & mask_e[None, :]
            m_tn = mask_t[:, None] & mask_n[None, :]
            u = _load_f32(u_cols + tt * s_u_l, m_te)
            x, dlt = _load_delta(d_cols + tt * s_d_l, m_te, bias, HAS_BIAS, SOFTPLUS)
            Bt = _load_f32(B_cols + tt * s_B_l, m_tn)
            Ct = _load_f32(C_cols + tt * s_C_l, m_tn)
            go = _load_f32(gout_ptr + el_cols + tt, m_te)

            # recompute the chunk's states from the one saved at its start
            dA = tl.exp2(dlt[:, :, None] * A2)  # (BLOCK_T, BLOCK_E, BLOCK_N)
            dBu = (dlt * u)[:, :, None] * Bt[:, None, :]
            cum_a, hs = tl.associative_scan((dA, dBu), axis=0, combine_fn=_affine_combine)
            hs = hs + cum_a * tl.load(ck_tile + c * E * N, mask=mask_en, other=0.0)[None, :, :]

            if HAS_Z:
                zt = _load_f32(z_cols + tt * s_z_l, m_te)
                sz = tl.sigmoid(zt)
                y = tl.sum(hs * Ct[:, None, :], axis=2)  # (BLOCK_T, BLOCK_E)
                if HAS_D:
                    y = y + Dv * u
                dz = go * y * sz * (1.0 + zt * (1.0 - sz))
                tl.store(dz_ptr + el_cols + tt, dz.to(dz_ptr.dtype.element_ty), mask=m_te)
                gy = go * zt * sz  # gradient reaching y before the gate
            else:
                gy = go

            # dh_t = gy_t C_t + dA_{t+1} dh_{t+1}: a reverse scan whose decay is the next step's
            if REVERSE:
                t_next = tt - 1
            else:
                t_next = tt + 1
            m_next = (p + 1 < L)[:, None] & mask_e[None, :]
            _, dlt_next = _load_delta(d_cols + t_next * s_d_l, m_next, bias, HAS_BIAS, SOFTPLUS)
            dA_next = tl.exp2(dlt_next[:, :, None] * A2)
            # run as a forward scan over the tiles flipped along time: the time axis is in-thread, so a
            # flip is only a renaming of registers, while Triton lowers reverse=True scans with lane
            # shuffles (Triton 3.6: 20 extra SASS instructions per element-step)
            cum_an, dhs = tl.associative_scan((tl.flip(dA_next, 0), tl.flip(gy[:, :, None] * Ct[:, None, :], 0)),
                                              axis=0, combine_fn=_affine_combine)
            dhs = dhs + cum_an * dh_next[None, :, :]  # time-flipped (BLOCK_T, BLOCK_E, BLOCK_N)
            dh_next = _row(dhs, BLOCK_T - 1, BLOCK_T)  # dh at the chunk's first step
            dhs = tl.flip(dhs, 0)

            # dC_t = sum_e gy h_t; dB_t = sum_e dh_t delta_t u_t (partials over this E block)
            dC_t = tl.sum(gy[:, :, None] * hs, axis=1)  # (BLOCK_T, BLOCK_N)
            dB_t = tl.sum(dhs * (dlt * u)[:, :, None], axis=1)
            if ATOMIC_DBC:
                tl.atomic_add(dC_ptr + nl_cols + tt, dC_t, mask=m_tn, sem="relaxed")
                tl.atomic_add(dB_ptr + nl_cols + tt, dB_t, mask=m_tn, sem="relaxed")
            else:
                tl.store(dC_ptr + nl_cols + tt, dC_t, mask=m_tn)
                tl.store(dB_ptr + nl_cols + tt, dB_t, mask=m_tn)
            dhB = tl.sum(dhs * Bt[:, None, :], axis=2)  # (BLOCK_T, BLOCK_E)
            # dh_t * dA_t * h_{t-1}, with dA_t h_{t-1} = h_t - dBu_t (no division, no shifted copy)
            hA = dhs * (hs - dBu)
            dA_acc += tl.sum(hA * dlt[:, :, None], axis=0)
            ddlt = tl.sum(hA * A, axis=2) + dhB * u
            du = dlt * dhB
            if HAS_D:
                du = du + gy * Dv
                dD_acc += tl.sum(gy * u, axis=0)
            if SOFTPLUS:
                ddlt = tl.where(x > 20.0, ddlt, ddlt * tl.sigmoid(x))
            ddlt = tl.where(m_te, ddlt, 0.0)
            dbias_acc += tl.sum(ddlt, axis=0)
            tl.store(du_ptr + el_cols + tt, du.to(du_ptr.dtype.element_ty), mask=m_te)
            tl.store(ddelta_ptr + el_cols + tt, ddlt.to(ddelta_ptr.dtype.element_ty), mask=m_te)
        # per-batch partials (batch, E, N) / (batch, E); summed over batch on the host
        tl.store(dA_ptr + pid_b * E * N + offs_e[:, None] * N + offs_n[None, :], dA_acc, mask=mask_en)
        if HAS_D:
            tl.store(dD_ptr + pid_b * E + offs_e, dD_acc, mask=mask_e)
        if HAS_BIAS:
            tl.store(dbias_ptr + pid_b * E + offs_e, dbias_acc, mask=mask_e)

    _KERNELS: dict[str, object] = {}

    def kernel(name: str):
        """The kernel ``name``, wrapped once (by :func:`_jit`) on first use."""
        if name not in _KERNELS:
            _KERNELS[name] = _jit({"fwd": _scan_fwd_kernel, "bwd": _scan_bwd_kernel}[name])
        return _KERNELS[name]
