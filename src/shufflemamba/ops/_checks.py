"""Argument checks of the ops' entry points (dispatcher, Triton, the CPU operators): every shape, dtype
and layout rule the kernels rely on, each failure one TypeError / ValueError line naming the argument."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_OPTIONAL = ("D", "z", "delta_bias")


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether this call records gradients: grad mode on and an input (None: absent) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_scan_inputs(
    fn: str,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    *,
    channel_last: bool = False,
) -> tuple[int, int, int, int]:
    """Raise a one-line TypeError / ValueError naming the first bad argument.

    Checks that every given argument is a floating-point tensor on u's device and has the shape
    the scan expects. Which float dtypes are accepted is left to each implementation.

    Args:
        fn: name of the public function, the prefix of every message.
        u, delta, A, B, C, D, z, delta_bias: the scan's arguments; D, z and delta_bias may be None.
        channel_last: the layout. False: u, delta, z (batch, E, L) and B, C (batch, N, L), as in
            mamba_ssm. True: u, delta, z (batch, L, E) and B, C (batch, L, N). A is (E, N) and
            D, delta_bias are (E,) in both.

    Returns:
        (batch, E, L, N).
    """
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in named.items():
        if t is None and name in _OPTIONAL:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but u is on {u.device}")
    if u.dim() != 3:
        layout = "(batch, L, E)" if channel_last else "(batch, E, L)"
        raise ValueError(f"{fn}: u must be {layout}, got shape {tuple(u.shape)}")
    if channel_last:
        batch, L, E = u.shape
    else:
        batch, E, L = u.shape
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"{fn}: A must be (E={E}, N), got shape {tuple(A.shape)}")
    N = A.shape[1]
    seq, state = ((batch, L, E), (batch, L, N)) if channel_last else ((batch, E, L), (batch, N, L))
    expected = dict(delta=seq, z=seq, B=state, C=state, D=(E,), delta_bias=(E,))
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    return batch, E, L, N


_KERNEL_DTYPES = (torch.float32, torch.float64)


def check_kernel_dtypes(fn: str, ref: Tensor, **tensors: Tensor | None) -> None:
    """The compiled kernels take one float32 or float64 dtype: ``ref``'s, shared by every given tensor."""
    if ref.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{fn}: float32 or float64 inputs expected, got {ref.dtype}")
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} is {t.dtype} but the input is {ref.dtype}")


def check_conv_inputs(fn: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """x (batch, L, E), weight (E, 1, K) or (E, K), bias (E,) or None, of one float32 / float64 dtype."""
    if x.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.numel() % x.shape[-1]:
        raise ValueError(f"{fn}: x (batch, L, E) and weight (E, 1, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"{fn}: bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")
    check_kernel_dtypes(fn, x, weight=weight, bias=bias)


def check_rms_inputs(fn: str, x: Tensor, weight: Tensor, res: Tensor | None = None) -> None:
    """x (..., D), weight (D,) and res (x's shape, optional) of one float32 / float64 dtype."""
    if x.dtype not in _KERNEL_DTYPES or weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise TypeError(f"{fn}: x (..., D) and weight (D,) of one float32/float64 dtype expected, got "
                        f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    if res is not None and (res.shape != x.shape or res.dtype != x.dtype):
        raise TypeError(f"{fn}: res must match x, got {tuple(res.shape)} {res.dtype} and {tuple(x.shape)} {x.dtype}")


def check_mixer_core_inputs(fn: str, xz: Tensor, dt_rank: int, directions: dict[str, Any]) -> None:
    """xz (batch, L, 2E) and each direction's parameters (a NamedTuple of conv_weight, conv_bias,
    x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D) with the mixer's shapes, in xz's dtype
    (A_log may be float32 for a float64 call)."""
    if xz.dim() != 3 or xz.shape[-1] % 2:
        raise ValueError(f"{fn}: xz must be (batch, L, 2E), got {tuple(xz.shape)}")
    if xz.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{fn}: float32 or float64 expected, got {xz.dtype}")
    E = xz.shape[-1] // 2
    for side, p in directions.items():
        for name, t in zip(p._fields, p):
            if t is not None and t.dtype != xz.dtype and not (name == "A_log" and t.dtype == torch.float32):
                raise TypeError(f"{fn}: parameters must be {xz.dtype}, got {t.dtype} for {side} {name}")
        N = p.A_log.shape[-1]
        expected = dict(conv_weight=(E, 1, p.conv_weight.shape[-1]), conv_bias=(E,),
                        x_proj_weight=(dt_rank + 2 * N, E), dt_proj_weight=(E, dt_rank), dt_proj_bias=(E,),
                        A_log=(E, N), D=(E,))
        for name, shape in expected.items():
            t = getattr(p, name)
            if t is not None and tuple(t.shape) != shape and not (name == "conv_weight" and t.shape == shape[::2]):
                raise ValueError(f"{fn}: {side} {name} must be {shape}, got {tuple(t.shape)}")
