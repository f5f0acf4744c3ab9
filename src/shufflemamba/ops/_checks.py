"""Argument checks shared by the selective-scan entry points (dispatcher, Triton, channel-last CPU)."""

from __future__ import annotations

from torch import Tensor

_OPTIONAL = ("D", "z", "delta_bias")


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
