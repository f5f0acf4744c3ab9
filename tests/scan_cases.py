"""Selective-scan inputs and the comparison of an implementation with the reference, forward and every
input's gradient (test_selective_scan.py, test_cpu_library.py)."""

from __future__ import annotations

import torch

from shufflemamba.ops import selective_scan


def make_inputs(batch=2, E=5, L=9, N=4, dtype=torch.float64, D=True, z=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    u = r(batch, E, L)
    delta = r(batch, E, L, scale=0.5)  # mixed signs: exercises softplus and negative raw steps
    A = -torch.rand(E, N, generator=g, dtype=torch.float64).add(0.1).to(dtype)  # stable decays
    B, C = r(batch, N, L), r(batch, N, L)
    Dv = r(E) if D else None
    zv = r(batch, E, L) if z else None
    bv = r(E, scale=0.5) if bias else None
    return [u, delta, A, B, C, Dv, zv, bv]


def run_scan(impl, inputs, softplus, gout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = selective_scan(*leaves, delta_softplus=softplus, impl=impl)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, gout.to(out.dtype))
    return out.detach(), grads


def compare_to_reference(impl, dtype, opts, atol, rtol, **shape):
    D, z, bias, softplus = opts
    inputs = make_inputs(dtype=dtype, D=D, z=z, bias=bias, **shape)
    gout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref_out, ref_grads = run_scan("ref", inputs, softplus, gout)
    out, grads = run_scan(impl, inputs, softplus, gout)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == rg.dtype and g.shape == rg.shape
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol)
