"""Glue to the CUDA kernels most Vim users already have: mamba_ssm's selective scan and causal-conv1d.

Neither package is required, and neither is imported when shufflemamba is: the first call that
could use one tries ``import`` once and remembers the answer (:func:`reset` forgets it, for tests).
Any failure to import (not installed, a build for another torch or CUDA, no GPU driver) just
means "not available", with the reason kept for ``shufflemamba doctor``-style reports.

Importing is not enough for mamba_ssm: since state-spaces/mamba#977 its CUDA extension is optional,
so a build without kernels imports and has ``selective_scan_fn``, and only calling it raises. It
counts as available on a device only after a tiny call there has run and matched the reference
(once per device; the answer is cached like the import's).

Published signatures this targets (state-spaces/mamba, Dao-AILab/causal-conv1d)::

    mamba_ssm.ops.selective_scan_interface.selective_scan_fn(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
        return_last_state=False)            # newer releases add cu_seqlens=None after it
    causal_conv1d.causal_conv1d_fn(
        x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
        final_states_out=None, activation=None)

Dtype rules of mamba_ssm's kernel (its ``TORCH_CHECK``s): u is float32, float16 or bfloat16; delta
and the (batch, N, L) B and C must have u's dtype, and so must z; A is float32 (the "weight type");
D and delta_bias are float32. The recurrence's state is float32 inside the kernel whatever u's
dtype. The wrapper makes u, delta, B, C, z contiguous along L itself. Official Vim under bf16
autocast therefore passes bf16 activations (delta too: it comes out of an autocast matmul) and
float32 A, D and dt bias, which is what :func:`selective_scan_mamba` produces from any mix.

causal-conv1d takes x (batch, dim, L) and weight (dim, width) with width 2..4; official Vim passes
the float32 conv weight and bias beside bf16 x under autocast, and so do we.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor

from .scan_reference import selective_scan_ref

__all__ = ["causal_conv1d", "mamba_ssm_scan", "reset", "selective_scan_mamba", "status"]

_SCAN_MODULE = "mamba_ssm.ops.selective_scan_interface"
_CONV_MODULE = "causal_conv1d"
_HALF_OK = (torch.float32, torch.float16, torch.bfloat16)

# module name -> (function or None, reason it is unavailable or "")
_cache: dict[str, tuple[Callable[..., Any] | None, str]] = {}
# device -> "" when mamba_ssm's selective_scan_fn ran there, else why not
_runs: dict[str, str] = {}


def _load(module: str, attr: str) -> tuple[Callable[..., Any] | None, str]:
    if module not in _cache:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as exc:  # ImportError, OSError from a mismatched .so, RuntimeError from CUDA
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            _cache[module] = (None, f"{type(exc).__name__}: {first}")
        else:
            _cache[module] = (fn, "")
    return _cache[module]


def reset() -> None:
    """Forget what earlier import attempts and trial calls found (tests put stand-in modules in
    ``sys.modules``)."""
    _cache.clear()
    _runs.clear()


def _default_device() -> torch.device:
    """Where a kernel would run when the caller does not say: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _trial_call(fn: Callable[..., Tensor], device: torch.device) -> str:
    """Run ``fn`` once on a tiny fp32 scan on ``device``: "" if it matches the reference, else why not."""
    g = torch.Generator().manual_seed(0)
    batch, E, L, N = 1, 4, 8, 2
    cpu = dict(u=torch.randn(batch, E, L, generator=g), delta=0.1 * torch.randn(batch, E, L, generator=g),
               A=-torch.rand(E, N, generator=g) - 0.5, B=torch.randn(batch, N, L, generator=g),
               C=torch.randn(batch, N, L, generator=g), D=torch.randn(E, generator=g),
               z=torch.randn(batch, E, L, generator=g), delta_bias=torch.full((E,), -2.0))
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            args = {k: v.to(device) for k, v in cpu.items()}
            out = fn(args.pop("u"), args.pop("delta"), args.pop("A"), args.pop("B"), args.pop("C"), **args,
                     delta_softplus=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel that fails asynchronously fails here
            ref = selective_scan_ref(**cpu, delta_softplus=True)
            err = (out.detach().float().cpu() - ref).abs().max().item() / ref.abs().max().item()
    except Exception as exc:  # RuntimeError / AttributeError / NameError from a build without kernels
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        return f"selective_scan_fn imports but raised on {device.type} ({type(exc).__name__}: {first})"
    if not err <= 1e-3:  # also catches NaN
        return f"selective_scan_fn ran on {device.type} but disagrees with the reference (max error {err:.2g})"
    return ""


def _scan_on(device: torch.device | str | None) -> tuple[Callable[..., Tensor] | None, str]:
    fn, why = _load(_SCAN_MODULE, "selective_scan_fn")
    if fn is None:
        return None, why
    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    key = str(dev)
    if key not in _runs:
        _runs[key] = _trial_call(fn, dev)
    return (fn, "") if not _runs[key] else (None, _runs[key])


def mamba_ssm_scan(device: torch.device | str | None = None) -> Callable[..., Tensor] | None:
    """mamba_ssm's ``selective_scan_fn`` if it imports here and a tiny call on ``device`` (default: the
    current CUDA device, else the CPU) ran and matched the reference; else None."""
    return _scan_on(device)[0]


def causal_conv1d() -> Callable[..., Tensor] | None:
    """causal-conv1d's ``causal_conv1d_fn`` if it imports here, else None."""
    return _load(_CONV_MODULE, "causal_conv1d_fn")[0]


def status(device: torch.device | str | None = None) -> dict[str, str]:
    """``{"mamba_ssm": "ok" | reason, "causal_conv1d": "ok" | reason}``: for reports. mamba_ssm is "ok"
    only if its kernel ran on ``device`` (default as :func:`mamba_ssm_scan`)."""
    conv, conv_why = _load(_CONV_MODULE, "causal_conv1d_fn")
    scan, scan_why = _scan_on(device)
    return {"mamba_ssm": "ok" if scan is not None else scan_why,
            "causal_conv1d": "ok" if conv is not None else conv_why}


def selective_scan_mamba(
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
    """Call mamba_ssm's ``selective_scan_fn`` with its dtype rules met; returns u's dtype.

    Activations (delta, B, C, z) are cast to u's dtype, parameters (A, D, delta_bias) to float32.
    Casts are differentiable, so every gradient comes back in its input's own dtype. Forward
    direction only: :func:`~shufflemamba.ops.selective_scan` flips for ``reverse=True``.

    Raises:
        RuntimeError: mamba_ssm does not import here, or its kernel does not run on u's device.
        TypeError: u is float64 (the kernel has no double build).
    """
    fn, why = _scan_on(u.device)
    if fn is None:
        raise RuntimeError(f"selective_scan: impl='mamba_ssm' unavailable ({why})")
    if u.dtype not in _HALF_OK:
        raise TypeError(f"selective_scan: impl='mamba_ssm' takes float32/float16/bfloat16 u, got {u.dtype}")
    act = u.dtype
    f32 = torch.float32
    out = fn(
        u, delta.to(act), A.to(f32), B.to(act), C.to(act),
        D=None if D is None else D.to(f32),
        z=None if z is None else z.to(act),
        delta_bias=None if delta_bias is None else delta_bias.to(f32),
        delta_softplus=delta_softplus,
    )
    return out.to(u.dtype)
