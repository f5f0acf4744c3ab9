"""The pure-PyTorch scan keeps its inputs' precision under autocast (its matmuls would run in bf16)."""

from __future__ import annotations

import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.ops.torch_scan import selective_scan_torch


def test_torch_scan_ignores_autocast():
    g = torch.Generator().manual_seed(0)
    b, E, L, N = 2, 8, 40, 4
    leaves = dict(u=torch.randn(b, E, L, generator=g), delta=0.5 * torch.randn(b, E, L, generator=g),
                  A=-torch.rand(E, N, generator=g) - 0.5, B=torch.randn(b, N, L, generator=g),
                  C=torch.randn(b, N, L, generator=g), D=torch.randn(E, generator=g),
                  z=torch.randn(b, E, L, generator=g), delta_bias=torch.full((E,), -1.0))
    gout = torch.randn(b, E, L, generator=g)

    def run(autocast: bool):
        x = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = selective_scan_torch(**x, delta_softplus=True)
            out.backward(gout)  # backward under autocast too: the hand-written backward's matmuls
        return out, {k: v.grad for k, v in x.items()}

    ref, ref_grads = run(False)
    out, grads = run(True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0, msg=lambda m, k=k: f"grad {k}: {m}")
