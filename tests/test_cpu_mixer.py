"""The fused CPU functions of the Vim block (ops/cpu_mixer.py): RMSNorm and the bidirectional mixer core."""

from __future__ import annotations

import pytest
import torch

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.models import mamba_mixer
from shufflemamba.models.mamba_mixer import BiMambaMixer, RMSNorm
from shufflemamba.ops import cpu_kernels, cpu_library, cpu_mixer, cpu_scan

from kernel_isas import isa  # noqa: F401  (fixture: each vector ISA's kernels)

pytestmark = pytest.mark.skipif(not cpu_scan.cpu_scan_available(), reason="compiled CPU kernels unavailable")


def _rms_reference(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rms_norm_kernel_gradcheck_float64(isa):
    from shufflemamba.ops.cpu_mixer import rms_norm_cpu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-5), _rms_reference(x, w, 1e-5))
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_cpu(a, b, 1e-5), (x, w))


@pytest.mark.parametrize("shape", [(128, 50, 96), (3, 1, 40), (1, 7)])
def test_rms_norm_module_fast_path_matches_torch_ops(shape, monkeypatch):
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(*shape, requires_grad=True)
    gy = torch.randn(*shape)
    out = norm(x)
    grads = torch.autograd.grad(out, [x, norm.weight], gy)
    monkeypatch.setattr(mamba_mixer, "_cpu_kernels_apply", lambda t: False)  # the plain torch ops
    ref = norm(x)
    ref_grads = torch.autograd.grad(ref, [x, norm.weight], gy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_add_rms_norm_kernel_gradcheck_float64(isa):
    """The residual add fused into the norm: both outputs and all three gradients, including the
    gradient reaching the sum from elsewhere (the next block's), against gradcheck in float64."""
    from shufflemamba.ops.cpu_mixer import add_rms_norm_cpu

    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = (torch.rand(9, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    out, s = add_rms_norm_cpu(x, res, w, 1e-5)
    torch.testing.assert_close(s, x + res)
    torch.testing.assert_close(out, _rms_reference(x + res, w, 1e-5))
    assert torch.autograd.gradcheck(lambda a, b, c: add_rms_norm_cpu(a, b, c, 1e-5), (x, res, w))

    def both_used(a, b, c):  # gradients reach both outputs in one backward: the kernel adds them
        out, s = add_rms_norm_cpu(a, b, c, 1e-5)
        return out * 1.5 + s.square()

    assert torch.autograd.gradcheck(both_used, (x, res, w))
    # one output unused: its gradient is None in the backward, not a tensor of zeros
    assert torch.autograd.gradcheck(lambda a, b, c: add_rms_norm_cpu(a, b, c, 1e-5)[0], (x, res, w))
    (gx, gres) = torch.autograd.grad(add_rms_norm_cpu(x, res, w, 1e-5)[1].sum(), (x, res))
    assert torch.equal(gx, torch.ones_like(x)) and torch.equal(gres, torch.ones_like(res))


def test_vim_block_fused_add_norm_matches_torch_ops(monkeypatch):
    """A Vim stack (blocks, then norm_f on residual + hidden) with the add fused into the CPU norm
    kernel computes what the plain add and norm ops do, forward and backward."""
    from shufflemamba.models.mamba_mixer import VimBlock
    from shufflemamba.models.features import final_add_norm

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(VimBlock(32, mixer_kwargs=dict(d_state=4)) for _ in range(3))
    norm_f = RMSNorm(32)
    with torch.no_grad():
        for m in [*blocks, norm_f]:
            for n, p in m.named_parameters():
                if n.endswith("norm.weight") or m is norm_f:
                    p.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32, requires_grad=True)
    params = [x, *blocks.parameters(), *norm_f.parameters()]

    def run():
        hidden, residual = x, None
        for b in blocks:
            hidden, residual = b(hidden, residual)
        out = final_add_norm(norm_f, hidden, residual)
        return out, torch.autograd.grad(out.square().sum(), params)

    calls = []
    real = RMSNorm.add_forward
    monkeypatch.setattr(RMSNorm, "add_forward", lambda self, a, r: calls.append(1) or real(self, a, r))
    out, grads = run()
    assert len(calls) == 3  # blocks 2 and 3 and norm_f took the fused path
    monkeypatch.setattr(RMSNorm, "fuses_add", lambda self, a, r: False)  # the plain add, then the norm
    ref, ref_grads = run()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_scan_backward_runs_x_proj_backward(dtype, tol):
    """sl_bwd given x_proj's weight adds x_proj's input gradient [ddt | dB | dC] W into du and returns
    its weight gradient [ddt | dB | dC]^T u: the same as the separate gradients and two matmuls (float32:
    the explicit-vector row functions where the build has them)."""
    g = torch.Generator().manual_seed(3)
    batch, L, E, N, R = 3, 9, 200, 3, 2  # two full channel blocks and a partial one add into each row
    f64 = dict(generator=g, dtype=dtype)
    u, dsave, z, gout = (torch.randn(batch, L, E, **f64) for _ in range(4))
    dsave = torch.nn.functional.softplus(dsave)
    A = -torch.rand(E, N, **f64) - 0.1
    B, C = (torch.randn(batch, L, N, **f64) for _ in range(2))
    D, dt, dtw, w = torch.randn(E, **f64), torch.randn(batch, L, R, **f64), torch.randn(E, R, **f64), \
        torch.randn(R + 2 * N, E, **f64)
    kw = dict(dz_accumulate=False, softplus=True, reverse=True, out_scale=0.5, dt=dt, dt_proj_weight=dtw)

    def grads(x_proj_weight):
        du, dz = torch.empty_like(u), torch.empty_like(u)
        res = cpu_kernels.scan_bwd_cl(u, dsave, None, A, B, C, D, z, gout, du, None, dz, x_proj_weight=x_proj_weight,
                                   **kw)
        return res, du, dz

    sep, du_sep, dz_sep = grads(None)
    fused, du_fused, dz_fused = grads(w)
    assert fused.dB is None and fused.ddt is None and sep.dx_proj_weight is None
    g_out = torch.cat([sep.ddt, sep.dB, sep.dC], -1).view(batch * L, -1)  # x_proj's output gradient
    torch.testing.assert_close(du_fused, du_sep + (g_out @ w).view(batch, L, E), rtol=tol, atol=tol)
    torch.testing.assert_close(fused.dx_proj_weight, g_out.t() @ u.view(-1, E), rtol=tol, atol=tol)
    assert torch.equal(dz_fused, dz_sep)
    for name in ("dA", "dD", "dbias", "ddt_proj_weight"):
        assert torch.equal(getattr(fused, name), getattr(sep, name)), name
    with pytest.raises(ValueError, match="x_proj_weight"):
        grads(w[1:])


@pytest.mark.parametrize("dim, d_state", [(96, 8), (192, 16)], ids=["J22", "J44"])
def test_fused_forward_float32_matches_separate_kernels(dim, d_state, monkeypatch):
    """The forward with the conv and x_proj inside the scan kernel (a sample per thread or more;
    float32: x_proj's explicit-vector passes of 2 and 3 vectors, L 7 leaving a partial tile of rows)
    gives the separate conv kernel and matmul's outputs and gradients (fewer samples than threads)."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(dim, d_state=d_state)
    hidden = torch.randn(3, 7, dim, requires_grad=True)
    gout = torch.randn(3, 7, dim)
    calls = []
    real = cpu_mixer.scan_fwd_cl
    monkeypatch.setattr(cpu_mixer, "scan_fwd_cl", lambda *a, **k: calls.append("conv" in k) or real(*a, **k))

    def run(threads):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        out = mixer(hidden)
        return out, torch.autograd.grad(out, [hidden, *mixer.parameters()], gout)

    out, grads = run(2)  # batch 3 >= 2 threads: fused
    assert calls == [True, True]
    ref, ref_grads = run(4)  # batch 3 < 4 threads: the conv kernel and a matmul first
    assert calls[2:] == [False, False]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rms_norm_kernel_rejects_mixed_dtypes():
    from shufflemamba.ops.cpu_mixer import rms_norm_cpu

    with pytest.raises(TypeError, match="rms_norm_cpu"):
        rms_norm_cpu(torch.randn(2, 4), torch.ones(4, dtype=torch.float64), 1e-5)
    with pytest.raises(TypeError, match="rms_norm_cpu"):
        rms_norm_cpu(torch.randn(2, 4), torch.ones(3), 1e-5)


def _core_inputs(E=6, L=5, N=2, R=2, K=3, batch=2, seed=0):
    from shufflemamba.ops.cpu_mixer import DirectionParams

    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    xz = r(batch, L, 2 * E, scale=1.0)
    dirs = [DirectionParams(r(E, 1, K), r(E), r(R + 2 * N, E), r(E, R), r(E),
                            torch.log(torch.rand(E, N, generator=g, dtype=torch.float64) + 0.2).requires_grad_(), r(E))
            for _ in range(2)]
    return xz, R, dirs


def test_mixer_core_gradcheck_float64(isa):
    """Finite differences through both directions (strided x / z, accumulated dx / dz, x_proj's split)."""
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    xz, R, (fwd, bwd) = _core_inputs()
    leaves = [xz, *fwd, *bwd]

    def f(xz, *flat):
        return bimamba_core_cl(xz, R, type(fwd)(*flat[:7]), type(fwd)(*flat[7:]))

    assert torch.autograd.gradcheck(f, leaves, atol=1e-6)


def test_mixer_core_gradcheck_without_a_conv_bias(isa):
    """A direction whose conv has no bias (the kernel then reduces no bias gradient) beside one that has:
    finite differences through both, and no gradient returned for the missing bias."""
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    xz, R, (fwd, bwd) = _core_inputs(seed=2)
    fwd = fwd._replace(conv_bias=None)
    leaves = [xz, *(t for t in (*fwd, *bwd) if t is not None)]

    def f(xz, *flat):
        it = iter(flat)
        return bimamba_core_cl(xz, R, type(fwd)(*(None if t is None else next(it) for t in fwd)),
                               type(bwd)(*(next(it) for _ in bwd)))

    assert torch.autograd.gradcheck(f, leaves, atol=1e-6)


def test_mixer_core_without_grad_matches_training_forward():
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    xz, R, (fwd, bwd) = _core_inputs(E=200, L=9, N=3)  # 200 channels: full blocks and a partial one
    out = bimamba_core_cl(xz, R, fwd, bwd)
    with torch.no_grad():
        out_eval = bimamba_core_cl(xz, R, fwd, bwd)
    torch.testing.assert_close(out_eval, out.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_mixer_core_with_fewer_samples_than_threads(monkeypatch, dtype, tol):
    """Fewer samples than threads: the conv and x_proj run over chunks of 64 steps on all threads (cx_fwd)
    instead of a sample a thread inside the scan kernel. Each sample alone (L 150: chunks of 64, 64 and 22)
    gives the batch's rows of the output and x's gradient."""
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    xz, R, dirs = _core_inputs(E=200, L=150, N=5, R=3, batch=5, seed=5)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (xz, *dirs[0], *dirs[1])]
    fwd, bwd = type(dirs[0])(*leaves[1:8]), type(dirs[0])(*leaves[8:])
    gy = torch.randn(5, 150, 200, generator=torch.Generator().manual_seed(6), dtype=dtype)
    out = bimamba_core_cl(leaves[0], R, fwd, bwd)  # 5 samples >= 4 threads: the fused path
    (gx,) = torch.autograd.grad(out, leaves[0], gy)
    for b in range(5):
        x1 = leaves[0][b:b + 1].detach().requires_grad_()
        out1 = bimamba_core_cl(x1, R, fwd, bwd)
        (gx1,) = torch.autograd.grad(out1, x1, gy[b:b + 1])
        torch.testing.assert_close(out1, out[b:b + 1].detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(gx1, gx[b:b + 1], rtol=tol, atol=tol)


def _core_results(lib, monkeypatch, dtype, threads=None, R=3, K=3):
    """Output and every gradient of the mixer core on fixed inputs (odd N: the generic backward's
    unpaired state; E = 200: two full channel blocks and a partial one), run with ``lib``. R = 17:
    dt_proj's lane sums come in a full group of 16 (or two of 8) and a partial one. K = 4 (Vim's): the
    conv's explicit rows take the steps between the edges apart."""
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    monkeypatch.setattr(cpu_library, "_lib", lib)
    if threads is not None:
        for module in (cpu_kernels, cpu_mixer):
            monkeypatch.setattr(module, "omp_threads", lambda work: threads)
    xz, R, dirs = _core_inputs(E=200, L=9, N=5, R=R, K=K, batch=3, seed=3)
    gy = torch.randn(3, 9, 200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (xz, *dirs[0], *dirs[1])]
    out = bimamba_core_cl(leaves[0], R, type(dirs[0])(*leaves[1:8]), type(dirs[0])(*leaves[8:]))
    return [out, *torch.autograd.grad(out, leaves, gy.to(dtype))]


def _worst(results, ref):
    """Largest error of any output or gradient, relative to that tensor's largest magnitude."""
    errs = [((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for a, r in zip(results, ref)]
    assert all(e == e for e in errs), errs  # a NaN must fail, not vanish in max()
    return max(errs)


@pytest.fixture(scope="module")
def width_libs(tmp_path_factory):
    """The kernels built without a width flag (the generic omp simd loops every CPU can run) and at each
    explicit width this CPU has (AVX-512: 512 and 256 bits; AVX2 + FMA, also with AVX-512 switched off);
    skipped where there is no explicit path."""
    import ctypes
    import os
    import shutil

    from shufflemamba.ops import config

    if not config.is_x86() or not config.has_avx2_fma():
        pytest.skip("no explicit x86 state loops here")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    builds = {"generic": (None, ()), "avx2": ("256", ("-mno-avx512f",))}
    if config.has_avx512():
        builds.update({"avx512": ("512", ()), "avx512-256bit": ("256", ())})
    libs = {}
    for name, (width, extra) in builds.items():
        path = tmp_path_factory.mktemp("kernels") / f"lib-{name}.so"
        cpu_library.build(cc, path, width, extra_flags=extra)
        libs[name] = ctypes.CDLL(str(path))
        cpu_library.declare(libs[name])
    return libs


def test_explicit_vector_state_loops_match_the_generic_ones(width_libs, monkeypatch):
    """On x86 the float32 state loops and the softplus / sigmoid rows are hand-vectorised
    (csrc/scan_steps_x86.h and pointwise_x86.h: AVX-512's exp through vreduceps / vscalefps, AVX2's through
    vroundps and the exponent bits, accumulators in registers). Every explicit build gives the generic build's outputs and
    gradients up to float32 rounding, and all are as close to float64."""
    libs = width_libs
    expected = {"generic": 0, "avx2": 256, "avx512": 512, "avx512-256bit": 256}
    assert {name: cpu_library.state_loop_bits(lib) for name, lib in libs.items()} == {n: expected[n] for n in libs}

    for R, K in ((3, 3), (17, 4)):
        ref = _core_results(libs["generic"], monkeypatch, torch.float64, R=R, K=K)  # float64: the generic loops
        plain = _core_results(libs["generic"], monkeypatch, torch.float32, R=R, K=K)
        assert _worst(plain, ref) < 1e-5  # measured on the Intel Xeon: ~1e-6 for each build
        for name in libs.keys() - {"generic"}:
            fast = _core_results(libs[name], monkeypatch, torch.float32, R=R, K=K)
            assert _worst(fast, ref) < 1e-5 and _worst(fast, plain) < 1e-5, (name, R, K)


def test_mixer_core_per_thread_partial_sums(monkeypatch):
    """The backward kernels add their parameter-gradient sums into one row per OpenMP thread: with
    two threads (the test shapes are below the size where the kernels use more than one) the
    results match one thread's up to float32 summation order, in float64 to 1e-12."""
    if torch.get_num_threads() < 2:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lib = cpu_library.library()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        one = _core_results(lib, monkeypatch, dtype, threads=1)
        two = _core_results(lib, monkeypatch, dtype, threads=2)
        assert _worst(two, one) < tol, dtype


def test_mixer_core_rejects_bad_input():
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    xz, R, (fwd, bwd) = _core_inputs()
    with pytest.raises(ValueError, match="2E"):
        bimamba_core_cl(xz[..., :-1], R, fwd, bwd)
    with pytest.raises(TypeError, match="parameters must be"):
        bimamba_core_cl(xz.float(), R, fwd, bwd)


def test_mixer_uses_the_fused_core_and_its_gradients_reach_every_parameter():
    torch.manual_seed(0)
    mixer = BiMambaMixer(48, d_state=4)
    hidden = torch.randn(2, 6, 48, requires_grad=True)
    assert mixer._use_fused_cpu(hidden)
    mixer(hidden).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_second_derivative_through_the_fused_functions_raises():
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl, rms_norm_cpu

    xz, R, (fwd, bwd) = _core_inputs()
    (g,) = torch.autograd.grad(bimamba_core_cl(xz, R, fwd, bwd).square().sum(), xz, create_graph=True)
    with pytest.raises(RuntimeError, match="backward through"):
        g.sum().backward()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(rms_norm_cpu(x, torch.ones(8, dtype=torch.float64), 1e-5).square().sum(), x,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="backward through"):
        g.sum().backward()


def test_second_derivative_through_the_compiled_scan_and_conv_raises():
    """The (batch, E, L) scan, the channel-last scan and conv: a hand-written backward each, so a
    second derivative must raise rather than silently miss the kernels' part."""
    from shufflemamba.ops import cpu_scan

    g = torch.Generator().manual_seed(0)
    batch, E, L, N = 2, 5, 6, 3
    u = torch.randn(batch, E, L, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(batch, E, L, generator=g, dtype=torch.float64)
    A = -torch.rand(E, N, generator=g, dtype=torch.float64)
    B, C = (torch.randn(batch, N, L, generator=g, dtype=torch.float64) for _ in range(2))
    calls = {
        "cpu": lambda: cpu_scan.selective_scan_cpu(u, delta, A, B, C, delta_softplus=True),
        "cl": lambda: cpu_scan.selective_scan_cl(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                                 C.transpose(1, 2), delta_softplus=True),
        "conv": lambda: cpu_scan.causal_conv1d_silu_cl(u.transpose(1, 2), torch.randn(E, 1, 4, dtype=torch.float64,
                                                                                        generator=g), None, False),
    }
    for name, call in calls.items():
        (gu,) = torch.autograd.grad(call().square().sum(), u, create_graph=True)
        with pytest.raises(RuntimeError, match="backward through"):
            gu.sum().backward()
