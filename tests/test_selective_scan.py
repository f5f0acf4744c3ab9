"""Fast selective-scan paths ("cpu": compiled C kernel, "torch": pure PyTorch) against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.ops import selective_scan, selective_scan_ref
from shufflemamba.ops import cpu_kernels, cpu_scan, torch_scan
from shufflemamba.ops.selective_scan import IMPLS

from kernel_isas import isa  # noqa: F401  (fixture: each vector ISA's kernels)
from scan_cases import compare_to_reference, make_inputs

FAST = ["cpu", "torch"]
OPTIONS = list(itertools.product([False, True], repeat=4))  # (D, z, delta_bias, softplus)


def _needs(impl: str) -> None:
    if impl == "cpu" and not cpu_scan.cpu_scan_available():
        pytest.skip("compiled CPU scan unavailable (no C compiler)")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "D{}-z{}-bias{}-sp{}".format(*map(int, o)))
def test_matches_reference_float64(impl, opts):
    _needs(impl)
    compare_to_reference(impl, torch.float64, opts, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "D{}-z{}-bias{}-sp{}".format(*map(int, o)))
def test_cpu_kernels_match_reference_float64_on_each_isa(isa, opts):
    """The (batch, E, L) kernels (ss_fwd / ss_bwd) of each vector ISA: output and every gradient."""
    compare_to_reference("cpu", torch.float64, opts, atol=1e-10, rtol=1e-10, batch=2, E=37, L=9, N=5)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("opts", [(False, False, False, False), (True, True, True, True)], ids=["bare", "full"])
def test_matches_reference_float32(impl, opts):
    _needs(impl)
    compare_to_reference(impl, torch.float32, opts, atol=1e-4, rtol=1e-4, batch=3, E=6, L=33, N=16)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("shape", [dict(batch=1, E=3, L=5, N=2), dict(batch=2, E=3, L=1, N=3), dict(batch=1, E=1, L=1, N=1)])
def test_edge_shapes(impl, shape):
    _needs(impl)
    compare_to_reference(impl, torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10, **shape)


def test_cpu_uneven_channel_chunks():
    """batch 1 makes the backward split E into chunks; E=7 leaves a short last chunk."""
    _needs("cpu")
    compare_to_reference("cpu", torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10, batch=1, E=7, L=6, N=3)


def test_torch_path_spans_several_chunks(monkeypatch):
    """Force short chunks so the state and gradient hand-over between chunks is exercised."""
    monkeypatch.setattr(torch_scan, "TORCH_SCAN_CHUNK_ELEMENTS", 2 * 5 * 4 * 3)  # chunk of 3 steps
    compare_to_reference("torch", torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10, batch=2, E=5, L=10, N=4)


@pytest.mark.parametrize("impl", FAST)
def test_gradcheck(impl):
    _needs(impl)
    inputs = make_inputs(batch=2, E=2, L=4, N=2)
    leaves = [t.requires_grad_() for t in inputs]

    def fn(*args):
        return selective_scan(*args, delta_softplus=True, impl=impl)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", FAST)
def test_bfloat16_inputs(impl):
    _needs(impl)
    inputs = make_inputs(batch=2, E=4, L=12, N=4, dtype=torch.float32)
    bf = [t.to(torch.bfloat16) if t is not None else None for t in inputs]
    bf[2] = inputs[2]  # A stays float32, as a parameter under autocast would
    leaves = [t.detach().requires_grad_() for t in bf]
    out = selective_scan(*leaves, delta_softplus=True, impl=impl)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_ref(*[t.float() for t in bf], delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)
    out.float().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad.float()).all()


def test_auto_on_cpu_uses_fast_path():
    inputs = make_inputs()
    out = selective_scan(*inputs, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan_ref(*inputs, delta_softplus=True), atol=1e-10, rtol=1e-10)
    expected = "cpu" if cpu_scan.cpu_scan_available() else "torch"
    from shufflemamba.ops.selective_scan import resolve_impl

    assert resolve_impl("auto", torch.device("cpu")) == expected


def test_no_large_state_saved_for_backward():
    """The fast paths must not keep a (batch, E, L, N) tensor alive for the backward."""
    batch, E, L, N = 2, 8, 64, 16
    for impl in FAST:
        _needs(impl)
        inputs = [t.requires_grad_() if t is not None else None for t in make_inputs(batch, E, L, N)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            selective_scan(*inputs, delta_softplus=True, impl=impl)
        assert saved and max(saved) < batch * E * L * N // 4, (impl, max(saved))


@pytest.mark.parametrize(
    "bad",
    [
        dict(u=torch.randn(2, 5)),  # 2-D input
        dict(delta=torch.randn(2, 5, 8)),  # wrong L
        dict(A=torch.randn(4, 4)),  # wrong E
        dict(B=torch.randn(2, 3, 9)),  # wrong N
        dict(C=torch.randn(1, 4, 9)),  # wrong batch
        dict(D=torch.randn(4)),
        dict(z=torch.randn(2, 5, 10)),
        dict(delta_bias=torch.randn(5, 1)),
    ],
    ids=lambda d: next(iter(d)),
)
def test_bad_shapes_raise(bad):
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    args = dict(zip(names, make_inputs(batch=2, E=5, L=9, N=4)))
    args.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        selective_scan(**args)


def test_bad_impl_and_types_raise():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="unknown impl"):
        selective_scan(*inputs, impl="cuda")
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        selective_scan(inputs[0].tolist(), *inputs[1:])
    with pytest.raises(TypeError, match="floating-point"):
        selective_scan(inputs[0].long(), *inputs[1:])
    assert set(IMPLS) == {"auto", "ref", "cpu", "torch", "triton", "mamba_ssm"}


# --- channel-last kernels of the Vim mixer (cpu_scan.selective_scan_cl / causal_conv1d_silu_cl) ---


def _cl_flip(t, reverse):
    return t.flip(1) if reverse else t


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("opts", [(True, True, True, True), (False, False, False, False), (True, False, True, False)],
                         ids=["full", "bare", "D-bias"])
@pytest.mark.parametrize("shape", [dict(batch=2, E=5, L=9, N=4), dict(batch=2, E=200, L=7, N=3)], ids=["small", "tail"])
def test_scan_cl_matches_reference(isa, reverse, opts, shape):
    """Strided (sliced) B, C, z; reverse equals flip(scan(flip)); E=200 has full channel blocks and a partial one."""
    _needs("cpu")
    D, z, bias, softplus = opts
    u, delta, A, B, C, Dv, zv, bv = make_inputs(D=D, z=z, bias=bias, **shape)
    batch, E, L, N = shape["batch"], shape["E"], shape["L"], shape["N"]
    # channel-last views: B and C are slices of one (batch, L, 3 + 2N) tensor, z a slice of (batch, L, 2E)
    xdbl = torch.cat([torch.zeros(batch, L, 3, dtype=u.dtype), B.transpose(1, 2), C.transpose(1, 2)], -1)
    zwide = torch.cat([torch.zeros_like(u), zv], 1).transpose(1, 2) if z else None
    cl = [u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A, xdbl[..., 3:3 + N],
          xdbl[..., 3 + N:], Dv, zwide[..., E:] if z else None, bv]
    assert not cl[3].is_contiguous() and (not z or not cl[6].is_contiguous())
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in cl]
    out = cpu_scan.selective_scan_cl(*leaves, delta_softplus=softplus, reverse=reverse)
    ref_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in cl]
    tr = [None if t is None else (_cl_flip(t, reverse).transpose(1, 2) if t.dim() == 3 else t) for t in ref_leaves]
    ref = _cl_flip(selective_scan_ref(*tr, delta_softplus=softplus).transpose(1, 2), reverse)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    present = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(out, [leaves[i] for i in present], gout)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in present], gout)
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=1e-9)


def test_scan_cl_float32_and_gradcheck():
    _needs("cpu")
    u, delta, A, B, C, Dv, zv, bv = make_inputs(batch=2, E=3, L=5, N=2)
    cl = [u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), Dv, zv.transpose(1, 2), bv]
    leaves = [t.detach().contiguous().requires_grad_() for t in cl]
    assert torch.autograd.gradcheck(lambda *a: cpu_scan.selective_scan_cl(*a, delta_softplus=True, reverse=True), leaves)
    out32 = cpu_scan.selective_scan_cl(*[t.detach().float() for t in cl], delta_softplus=True)
    out64 = cpu_scan.selective_scan_cl(*[t.detach() for t in cl], delta_softplus=True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out64.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anticausal"])
@pytest.mark.parametrize("K", [4, 2])
def test_conv_cl_matches_conv1d(isa, reverse, K, bias):
    _needs("cpu")
    g = torch.Generator().manual_seed(0)
    batch, L, E = 3, 7, 200  # full channel blocks and a partial one
    wide = torch.randn(batch, L, 2 * E, generator=g, dtype=torch.float64)
    x = wide[..., :E].clone().requires_grad_()
    w = torch.randn(E, 1, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    out = cpu_scan.causal_conv1d_silu_cl(wide[..., :E].detach().requires_grad_(), w, b, reverse)
    xs = _cl_flip(x, reverse).transpose(1, 2)
    # depthwise causal conv as K shifted products (F.conv1d in float64 takes ~1 s here)
    xpad = F.pad(xs, (K - 1, 0))  # (batch, E, L + K - 1)
    pre = sum(w[:, 0, k, None] * xpad[..., k:k + L] for k in range(K)) + (b[:, None] if bias else 0)
    ref = _cl_flip(F.silu(pre).transpose(1, 2), reverse)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # gradients through a strided (sliced) input
    xin = wide.clone().requires_grad_()
    out = cpu_scan.causal_conv1d_silu_cl(xin[..., :E], w, b, reverse)
    gout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    params = (w, b) if bias else (w,)
    gx, *gp = torch.autograd.grad(out, (xin, *params), gout)
    rx, *rp = torch.autograd.grad(ref, (x, *params), gout)
    torch.testing.assert_close(gx[..., :E], rx, atol=1e-12, rtol=1e-12)
    assert torch.count_nonzero(gx[..., E:]) == 0
    for a, r in zip(gp, rp):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anticausal"])
@pytest.mark.parametrize("K, L", [(4, 9), (2, 9), (4, 2)])
def test_conv_cl_float32_matches_float64(isa, reverse, K, L):
    """float32 runs the explicit x86 conv rows (csrc/conv_steps_x86.h: the steps between the edges apart
    from the edges, whole vectors apart from the masked last one; E = 203 leaves a partial vector at 256
    and 512 bits; L = 2 < K: edges only): output and gradients agree with the float64 kernels on the same
    values."""
    _needs("cpu")
    g = torch.Generator().manual_seed(1)
    batch, E = 2, 203
    x = torch.randn(batch, L, E, generator=g, dtype=torch.float64)
    w = torch.randn(E, 1, K, generator=g, dtype=torch.float64) / K
    b = torch.randn(E, generator=g, dtype=torch.float64)
    gout = torch.randn(batch, L, E, generator=g, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        out = cpu_scan.causal_conv1d_silu_cl(*leaves, reverse)
        results[dtype] = [out, *torch.autograd.grad(out, leaves, gout.to(dtype))]
    for a, ref in zip(results[torch.float32], results[torch.float64]):
        torch.testing.assert_close(a.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_conv_cl_takes_the_weight_as_e_k_too():
    """The kernels read the conv weight in place as (E, K) rows: (E, 1, K) and (E, K) give the same output
    and gradients, each gradient in its weight's shape."""
    _needs("cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    w3 = torch.randn(10, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = w3.detach().view(10, 4).clone().requires_grad_()
    gout = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    outs = [cpu_scan.causal_conv1d_silu_cl(x, w, None) for w in (w3, w2)]
    assert torch.equal(outs[0], outs[1])
    (g3,), (g2,) = (torch.autograd.grad(o, [w], gout) for o, w in zip(outs, (w3, w2)))
    assert g3.shape == w3.shape and g2.shape == w2.shape and torch.equal(g3.view(10, 4), g2)


def test_scan_kernel_calls_reject_weights_not_in_rows():
    """scan_fwd_cl / scan_bwd_cl read A and dt_proj's weight in place as E contiguous rows: a transposed
    (strided) one is refused by name instead of read as the wrong layout."""
    _needs("cpu")
    batch, L, E, N = 2, 3, 5, 2
    u, out = torch.randn(batch, L, E), torch.empty(batch, L, E)
    A, B = -torch.rand(N, E).t(), torch.randn(batch, L, N)  # (E, N) but not contiguous
    kw = dict(softplus=True, reverse=False, out_scale=1.0)
    with pytest.raises(ValueError, match="A must be contiguous"):
        cpu_kernels.scan_fwd_cl(u, u, A, B, B, None, None, None, out, None, None, **kw)
    with pytest.raises(ValueError, match="A must be contiguous"):
        cpu_kernels.scan_bwd_cl(u, u, None, A, B, B, None, None, u, torch.empty_like(u), torch.empty_like(u), None,
                                dz_accumulate=False, **kw)


def test_cl_kernels_reject_bad_input():
    _needs("cpu")
    u = torch.randn(2, 5, 3)
    A = -torch.rand(3, 4)
    Bm = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        cpu_scan.selective_scan_cl(u, u, A, Bm[..., :3], Bm)
    with pytest.raises(TypeError, match="delta"):
        cpu_scan.selective_scan_cl(u, u.double(), A, Bm, Bm)
    with pytest.raises(ValueError, match="conv1d"):
        cpu_scan.causal_conv1d_silu_cl(u, torch.randn(4, 1, 4), None)


@pytest.mark.parametrize("dtype", [torch.float32])  # float64: F.conv1d of the unfused path takes seconds
def test_mixer_fused_cpu_path_matches_unfused(dtype):
    """The mixer's channel-last path (no flips) gives the unfused path's outputs and gradients."""
    _needs("cpu")
    from shufflemamba.models import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(40, d_state=4).to(dtype)
    hidden = torch.randn(2, 11, 40, dtype=dtype, requires_grad=True)
    assert mixer._use_fused_cpu(hidden)
    out = mixer(hidden)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden, *mixer.parameters()], gout)
    mixer.scan_impl = "torch"  # forces the unfused (batch, E, L) path
    assert not mixer._use_fused_cpu(hidden)
    ref = mixer(hidden)
    ref_grads = torch.autograd.grad(ref, [hidden, *mixer.parameters()], gout)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **tol)


def test_cpu_kernel_flushes_denormals_and_restores_the_callers_mode():
    """The compiled kernels run with denormals flushed (x86 slows ~100x on them: long products of
    decays reach them) and leave the calling thread's floating-point mode as they found it."""
    _needs("cpu")
    import platform

    if platform.machine() not in ("x86_64", "AMD64", "i686"):
        pytest.skip("FTZ/DAZ is set on x86 only")
    torch.set_flush_denormal(False)
    # one input at t=0, then strong decay: h_t = e^{-10 t}, below fp32's normal range after ~9 steps
    L = 12
    u = torch.zeros(1, 1, L)
    u[0, 0, 0] = 1.0
    delta = torch.ones(1, 1, L)
    A = torch.full((1, 1), -10.0)
    B = torch.ones(1, 1, L)
    C = torch.ones(1, 1, L)
    ref = selective_scan(u, delta, A, B, C, impl="ref")
    out = selective_scan(u, delta, A, B, C, impl="cpu")
    tiny = torch.finfo(torch.float32).tiny
    assert 0 < ref[0, 0, 9].abs() < tiny  # the reference (plain torch) keeps the denormal ...
    assert out[0, 0, 9] == 0  # ... the kernel flushes it
    torch.testing.assert_close(out[..., :8], ref[..., :8], rtol=1e-5, atol=0)
    assert (torch.tensor([1e-30]) * 1e-10).item() != 0  # this thread still computes denormals


def test_scan_cl_out_scale_matches_the_scaled_scan():
    """out_scale * scan(...), scaled in the kernel: the values and every gradient equal those of the
    separate expression."""
    _needs("cpu")
    u, delta, A, B, C, Dv, zv, bv = make_inputs(batch=2, E=70, L=7, N=3)
    cl = [u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), Dv, zv.transpose(1, 2), bv]
    gout = torch.randn(2, 7, 70, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(fused):
        leaves = [t.detach().contiguous().requires_grad_() for t in cl]
        if fused:
            out = cpu_scan.selective_scan_cl(*leaves, delta_softplus=True, reverse=True, out_scale=0.5)
        else:
            out = 0.5 * cpu_scan.selective_scan_cl(*leaves, delta_softplus=True, reverse=True)
        return out.detach(), torch.autograd.grad(out, leaves, gout)

    out, grads = run(True)
    ref, ref_grads = run(False)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("L, d_state", [(6, 3), (300, 7)], ids=["short", "long"])
@pytest.mark.parametrize("threads", [1, 8], ids=["conv-in-scan-kernel", "conv-kernel-first"])
def test_mixer_fused_combine_matches_reference_directions(isa, dtype, L, d_state, threads, monkeypatch):
    """The mixer core operator gives the reference ``_direction`` path's output and the gradients of
    the input and every parameter, on each vector ISA, with the forward's conv and x_proj in the scan
    kernel (batch 3 >= threads) and before it (batch 3 < 8 threads). At L 300 the scan backward runs
    its recurrences in groups of states (mixer_cl.c's sm_state_group; with a 2 MB L2, 7 states as
    3 + 3 + 1 in float32 and one at a time in float64), the per-step sums over the states adding up
    across the groups."""
    _needs("cpu")
    from shufflemamba.models import BiMambaMixer

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(1)
    mixer = BiMambaMixer(8, d_state=d_state, dt_rank=2).to(dtype)  # E = 16: float64 conv1d stays fast
    hidden = torch.randn(3, L, 8, dtype=dtype, requires_grad=True)
    assert mixer._use_fused_cpu(hidden)
    out = mixer(hidden)
    gout = torch.randn_like(out)
    params = [hidden, *mixer.parameters()]
    grads = torch.autograd.grad(out, params, gout)
    # the reference: both directions through _direction on (B, E, L), the scan by selective_scan_ref
    mixer.scan_impl = "ref"
    assert not mixer._use_fused_cpu(hidden)
    ref = mixer(hidden)
    ref_grads = torch.autograd.grad(ref, params, gout)
    tol = dict(atol=1e-11, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for (name, _), g, rg in zip([("hidden", None), *mixer.named_parameters()], grads, ref_grads):
        assert torch.count_nonzero(rg) > 0, name
        torch.testing.assert_close(g, rg, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_scan_cl_float32_softplus_and_its_derivative_are_accurate():
    """With L = 1, N = 1, u = B = C = 1, no D or z and a zero state, the scan's output is
    d = softplus(delta) and d out / d delta = sigmoid(delta): this checks the float32 kernels'
    inlined softplus and expm1 (sigmoid = -expm1(-d)) against torch over [-30, 30], to a few ulp."""
    _needs("cpu")
    x = torch.cat([torch.linspace(-30, 30, 4001), torch.tensor([-1e-6, 0.0, 1e-6, 0.34, 0.36, 19.99, 20.01])])
    delta = x.reshape(1, 1, -1).clone().requires_grad_()  # (batch 1, L 1, E channels)
    ones = torch.ones(1, 1, x.numel())
    out = cpu_scan.selective_scan_cl(ones, delta, -torch.ones(x.numel(), 1), torch.ones(1, 1, 1), torch.ones(1, 1, 1),
                                     delta_softplus=True)
    (g,) = torch.autograd.grad(out.sum(), delta)
    x64 = x.double()
    torch.testing.assert_close(out.flatten().double(), F.softplus(x64), rtol=5e-7, atol=1e-30)
    torch.testing.assert_close(g.flatten().double(), torch.sigmoid(x64), rtol=5e-7, atol=1e-30)


def test_scan_cl_float32_decay_extremes():
    """The float32 kernels' inlined 2^x for the decays exp(delta A): tiny steps (decays within 1e-8 of
    1) and huge ones (delta |A| up to 1.5e4, far below 2^-126: the argument must be clamped, or the
    exponent bits wrap into garbage) match the float64 reference, and a NaN step reaches the output
    instead of vanishing."""
    _needs("cpu")
    g = torch.Generator().manual_seed(0)
    batch, L, E, N = 2, 7, 40, 3
    u = torch.randn(batch, L, E, generator=g)
    A = -torch.rand(E, N, generator=g) - 0.5
    B, C = torch.randn(batch, L, N, generator=g), torch.randn(batch, L, N, generator=g)

    def cl(delta):
        return cpu_scan.selective_scan_cl(u, delta, A, B, C)

    def ref(delta):
        t = lambda x: x.transpose(1, 2)  # noqa: E731  (batch, L, .) -> (batch, ., L)
        return t(selective_scan_ref(t(u).double(), t(delta).double(), A.double(), t(B).double(), t(C).double()))

    for value in (1e-8, 200.0, 1e4):
        delta = torch.full((batch, L, E), value)
        torch.testing.assert_close(cl(delta).double(), ref(delta), rtol=1e-5, atol=1e-5 * value)
    nan_delta = torch.rand(batch, L, E, generator=g)
    nan_delta[0, 2, 5] = float("nan")
    out = cl(nan_delta)
    assert torch.isnan(out[0, 2:, 5]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("softplus", [True, False])
def test_scan_cl_fused_dt_proj_matches_a_given_delta(softplus):
    """sl_fwd with dt and dt_proj's weight (delta = dt W formed per step in the kernel) gives what it
    gives for that delta passed in, with and without softplus (E 200: full channel blocks and a partial one)."""
    _needs("cpu")
    g = torch.Generator().manual_seed(5)
    batch, L, E, N, R = 2, 7, 200, 3, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, dt, dtw = r(batch, L, E), r(batch, L, R) * 0.3, r(E, R) * 0.3
    A, B, C, D, z, bias = -r(E, N).abs() - 0.2, r(batch, L, N), r(batch, L, N), r(E), r(batch, L, E), r(E) * 0.1
    delta = (dt @ dtw.t()).contiguous()
    outs = []
    for kw in (dict(dt=dt, dt_proj_weight=dtw), {}):
        out, dsave = torch.empty(batch, L, E, dtype=torch.float64), torch.empty(batch, L, E, dtype=torch.float64)
        cpu_kernels.scan_fwd_cl(u, None if kw else delta, A, B, C, D, z, bias, out, dsave, None, softplus=softplus,
                             reverse=False, out_scale=1.0, **kw)
        outs.append((out, dsave))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-12, rtol=1e-10)
