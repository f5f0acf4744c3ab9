"""Triton selective scan: fused forward and backward kernels for the GPU.

Same semantics and argument order as :func:`shufflemamba.ops.selective_scan.selective_scan_ref`::

    u, delta, z: (batch, E, L)   A: (E, N)   B, C: (batch, N, L)   D, delta_bias: (E,)

Design: one program per (batch row, block of ``BLOCK_E`` channels), looping over L in chunks of
``BLOCK_T`` steps. The state (BLOCK_E, N) is carried between chunks in registers, in fp32.

* Forward, per chunk: load (BLOCK_E, BLOCK_T) tiles of u, delta, z and (N, BLOCK_T) tiles of B, C,
  each contiguous along time (coalesced, unlike one strided element per channel and step), form the
  per-step decay exp(delta A) and input delta B u as (BLOCK_E, N, BLOCK_T) register tiles, and run
  the recurrence h_t = a_t h_{t-1} + b_t over the chunk as a parallel scan (``tl.associative_scan``
  with the composition of affine maps). delta_bias + softplus, the D skip and the silu(z) gate are
  fused; only the output is written, plus, when gradients are needed, the state at every chunk's
  start: (batch, L/BLOCK_T, E, N).
* Backward, chunks in reverse: recompute the chunk's states from its saved start (the same parallel
  scan), then get dh_t = gy_t C_t + exp(delta_{t+1} A) dh_{t+1} as a parallel scan from the chunk's
  end (a forward scan over the tiles flipped along time) whose carry is dh at the next chunk's
  first step. dA_t h_{t-1} is taken as h_t - delta_t B_t u_t, so no
  shifted copy is needed. Nothing of size (batch, E, L, N) is ever written to memory. dB and dC
  (sums over E) are added into one fp32 buffer with float atomics, or, under
  ``torch.use_deterministic_algorithms(True)``, written as one slice per E block and summed after.
  The sums over batch (dA, dD, ddelta_bias) are per-row partials summed with torch.
* ``reverse=True`` scans from the end (the mixer's backward direction) by reading time L-1-p at scan
  position p: no flipped copies.

Activation tiles are widened to fp32 in inline PTX on the GPU (see ``_load_f32_opaque``), and no
reduction relies on an order of combines that Triton does not promise. ``python -m
shufflemamba.bench.triton_compile --check`` holds every variant to a SASS instruction budget under the
installed Triton (3.6 and 3.9 both pass).

The kernels themselves are in :mod:`shufflemamba.ops.triton_kernels`. Triton is optional: this module imports without it, and :func:`triton_available` says whether the
kernels can run. With ``TRITON_INTERPRET=1`` set before triton is first imported, the same kernel
source runs in Triton's interpreter on CPU tensors: that is how the tests check the kernels on
machines without a GPU. Otherwise the kernels are compiled and need CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import triton_kernels as tk
from ._checks import check_scan_inputs
from .triton_kernels import HAS_TRITON, interpreter_mode, triton

__all__ = ["LaunchConfig", "launch_config", "selective_scan_triton", "triton_available"]


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run.

    Args:
        device: where the tensors will live. ``None`` asks whether they can run anywhere here (a CUDA
            device, or Triton's CPU interpreter); "cuda" asks for compiled kernels on a GPU; "cpu"
            asks for the interpreter (correct but slow: meant for tests), which triton only offers when
            ``TRITON_INTERPRET=1`` was set before triton was first imported.
    """
    if not HAS_TRITON:
        return False
    if device is None:
        return torch.cuda.is_available() or interpreter_mode()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu":
        return interpreter_mode()
    return False


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and warps of one launch: programs hold (block_t, block_e, N) tiles in registers."""

    block_e: int  # channels per program
    block_t: int  # time steps per chunk (the parallel scan's length; a state is saved per chunk)
    num_warps: int


def launch_config(E: int, batch: int, N: int, interpret: bool) -> LaunchConfig:
    """Tile sizes for a (batch, E, L) scan with N states.

    On a GPU a program keeps a few (block_t, block_e, N) fp32 tiles live, so their size is held at
    2048 elements (16 per thread at 4 warps). Among the shapes of that size, 16 steps x 8 channels
    compiled best for sm_90 (``python -m shufflemamba.bench.triton_compile``, see docs/benchmarks.md):
    no register spills, and the fewest SASS instructions per element and step in both kernels.
    A Vim-Ti layer at batch 32 then runs 1536 programs. The interpreter runs programs one after
    another, in numpy: few wide programs are fastest there.
    """
    block_n = triton.next_power_of_2(N)
    if interpret:
        return LaunchConfig(block_e=min(triton.next_power_of_2(E), 64), block_t=16, num_warps=4)
    block_t = 16
    block_e = max(1, min(triton.next_power_of_2(E), 2048 // (block_n * block_t)))
    return LaunchConfig(block_e=block_e, block_t=block_t, num_warps=4)


def _strides3(t: Tensor | None, like: Tensor) -> tuple[int, int, int]:
    return tuple((t if t is not None else like).stride())  # type: ignore[return-value]


class _Launch(NamedTuple):
    """One kernel launch: ``kernel(name)[grid](*args, **meta)``; ``outputs`` are what it writes."""

    name: str
    grid: tuple[int, int]
    args: tuple
    meta: dict
    outputs: tuple


def _input_args(u, delta, A, B, C, D, z, delta_bias) -> tuple[tuple, tuple]:
    """Both kernels' leading arguments: the input pointers (``u`` stands in for absent optional
    tensors; the HAS_* flags keep them unread) and the input strides."""
    ptrs = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u)
    strides = (*u.stride(), *delta.stride(), *_strides3(z, u), *B.stride(), *C.stride(), *A.stride())
    return ptrs, strides


def _meta(cfg: LaunchConfig, N: int, D, z, delta_bias, softplus: bool, reverse: bool, **extra) -> dict:
    """Both kernels' compile-time flags, tile sizes and launch options."""
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                REVERSE=reverse, **extra, BLOCK_E=cfg.block_e, BLOCK_N=triton.next_power_of_2(N),
                BLOCK_T=cfg.block_t, num_warps=cfg.num_warps, enable_fp_fusion=True)


def fwd_launch(u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool, save_ckpt: bool,
                interpret: bool, cfg: LaunchConfig | None = None) -> _Launch:
    batch, E, L, N = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    cfg = cfg or launch_config(E, batch, N, interpret)
    nchunk = triton.cdiv(L, cfg.block_t)
    out = torch.empty((batch, E, L), device=u.device, dtype=u.dtype)
    # (batch, n_chunks, E, N) fp32 states at chunk starts; a dummy pointer when not needed
    ckpt = (torch.empty((batch, nchunk, E, N), device=u.device, dtype=torch.float32) if save_ckpt
            else out)
    ptrs, strides = _input_args(u, delta, A, B, C, D, z, delta_bias)
    args = (*ptrs, out, ckpt, *strides, E, L, N, nchunk)
    meta = _meta(cfg, N, D, z, delta_bias, softplus, reverse, SAVE_CKPT=save_ckpt)
    return _Launch("fwd", (batch, triton.cdiv(E, cfg.block_e)), args, meta,
                   (out, ckpt if save_ckpt else None))


def bwd_launch(u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool, ckpt: Tensor,
                gout: Tensor, interpret: bool, cfg: LaunchConfig | None = None) -> _Launch:
    batch, E, L, N = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    cfg = cfg or launch_config(E, batch, N, interpret)
    nchunk = triton.cdiv(L, cfg.block_t)
    n_eblk = triton.cdiv(E, cfg.block_e)
    dev, f32 = u.device, torch.float32
    gout = gout.contiguous()
    du = torch.empty((batch, E, L), device=dev, dtype=u.dtype)
    ddelta = torch.empty((batch, E, L), device=dev, dtype=delta.dtype)
    dz = torch.empty((batch, E, L), device=dev, dtype=z.dtype) if z is not None else du
    # dB and dC reduce over E: float atomics into one fp32 buffer, unless PyTorch was asked for
    # deterministic algorithms (atomics add in a varying order): then a slice per E block, summed after
    atomic = not torch.are_deterministic_algorithms_enabled()
    if atomic:
        dB_part = torch.zeros((1, batch, N, L), device=dev, dtype=f32)
        dC_part = torch.zeros((1, batch, N, L), device=dev, dtype=f32)
    else:
        dB_part = torch.empty((n_eblk, batch, N, L), device=dev, dtype=f32)
        dC_part = torch.empty((n_eblk, batch, N, L), device=dev, dtype=f32)
    dA_part = torch.empty((batch, E, N), device=dev, dtype=f32)
    dD_part = torch.empty((batch, E), device=dev, dtype=f32) if D is not None else dA_part
    dbias_part = torch.empty((batch, E), device=dev, dtype=f32) if delta_bias is not None else dA_part
    ptrs, strides = _input_args(u, delta, A, B, C, D, z, delta_bias)
    args = (*ptrs, gout, ckpt, du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
            *strides, batch, E, L, N, nchunk)
    meta = _meta(cfg, N, D, z, delta_bias, softplus, reverse, ATOMIC_DBC=atomic)
    return _Launch("bwd", (batch, n_eblk), args, meta,
                   (du, ddelta, dz if z is not None else None, dB_part, dC_part, dA_part,
                    dD_part if D is not None else None, dbias_part if delta_bias is not None else None))


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool, save_ckpt: bool):
    launch = fwd_launch(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, save_ckpt,
                         interpreter_mode())
    tk.kernel("fwd")[launch.grid](*launch.args, **launch.meta)
    return launch.outputs


def _backward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool, ckpt: Tensor,
              gout: Tensor):
    launch = bwd_launch(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, ckpt, gout,
                         interpreter_mode())
    tk.kernel("bwd")[launch.grid](*launch.args, **launch.meta)
    du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part = launch.outputs
    # the partial sums of the E blocks (dB, dC) and of the batch rows (dA, dD, dbias)
    dB = dB_part.sum(0).to(B.dtype)
    dC = dC_part.sum(0).to(C.dtype)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        save = any(ctx.needs_input_grad[:8])  # (forward itself runs with grad mode off)
        # the chunk states cost 1/block_t of a full (batch, E, L, N) history; skip them for inference
        out, ckpt = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save_ckpt=save)
        ctx.delta_softplus = delta_softplus
        ctx.reverse = reverse
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        grads = _backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.reverse, ckpt, gout)
        return (*grads, None, None)


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
    reverse: bool = False,
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
        reverse: scan from the sequence's end. Equals flipping every (.., L) input along L, scanning,
            and flipping the output back, without the copies (the bidirectional mixer's second
            direction).

    Returns:
        (batch, E, L) tensor in ``u.dtype``. State and accumulation are fp32 whatever the inputs.

    CUDA tensors run the compiled kernels; CPU tensors run in Triton's interpreter when TRITON_INTERPRET=1
    was set before triton was imported (slow; for tests).
    """
    if not HAS_TRITON:
        raise ImportError("selective_scan_triton needs triton: pip install 'shufflemamba[triton]'")
    check_scan_inputs("selective_scan_triton", u, delta, A, B, C, D, z, delta_bias)
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"selective_scan_triton: unsupported dtype {u.dtype} (use fp32, fp16 or bf16)")
    if u.device.type != "cuda" and not interpreter_mode():
        raise ValueError(
            f"selective_scan_triton: tensors on {u.device} need a CUDA device, or TRITON_INTERPRET=1 set "
            "before triton is first imported (Triton's CPU interpreter, for tests)"
        )
    if u.shape[2] == 0:
        return u.new_empty(u.shape)
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                      bool(reverse))
