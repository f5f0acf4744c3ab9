"""Fast selective-scan paths ("cpu": compiled C kernel, "torch": pure PyTorch) against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.ops import selective_scan, selective_scan_ref
from shufflemamba.ops import cpu_scan, torch_scan
from shufflemamba.ops.selective_scan import IMPLS

FAST = ["cpu", "torch"]
OPTIONS = list(itertools.product([False, True], repeat=4))  # (D, z, delta_bias, softplus)


def _needs(impl: str) -> None:
    if impl == "cpu" and not cpu_scan.cpu_scan_available():
        pytest.skip("compiled CPU scan unavailable (no C compiler)")


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


def _run(impl, inputs, softplus, gout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = selective_scan(*leaves, delta_softplus=softplus, impl=impl)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, gout.to(out.dtype))
    return out.detach(), grads


def _compare(impl, dtype, opts, atol, rtol, **shape):
    D, z, bias, softplus = opts
    inputs = make_inputs(dtype=dtype, D=D, z=z, bias=bias, **shape)
    gout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref_out, ref_grads = _run("ref", inputs, softplus, gout)
    out, grads = _run(impl, inputs, softplus, gout)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == rg.dtype and g.shape == rg.shape
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "D{}-z{}-bias{}-sp{}".format(*map(int, o)))
def test_matches_reference_float64(impl, opts):
    _needs(impl)
    _compare(impl, torch.float64, opts, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("opts", [(False, False, False, False), (True, True, True, True)], ids=["bare", "full"])
def test_matches_reference_float32(impl, opts):
    _needs(impl)
    _compare(impl, torch.float32, opts, atol=1e-4, rtol=1e-4, batch=3, E=6, L=33, N=16)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("shape", [dict(batch=1, E=3, L=5, N=2), dict(batch=2, E=3, L=1, N=3), dict(batch=1, E=1, L=1, N=1)])
def test_edge_shapes(impl, shape):
    _needs(impl)
    _compare(impl, torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10, **shape)


def test_cpu_uneven_channel_chunks():
    """batch 1 makes the backward split E into chunks; E=7 leaves a short last chunk."""
    _needs("cpu")
    _compare("cpu", torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10, batch=1, E=7, L=6, N=3)


def test_torch_path_spans_several_chunks(monkeypatch):
    """Force short chunks so the state and gradient hand-over between chunks is exercised."""
    monkeypatch.setattr(torch_scan, "_CHUNK_ELEMENTS", 2 * 5 * 4 * 3)  # chunk of 3 steps
    _compare("torch", torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10, batch=2, E=5, L=10, N=4)


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
    from shufflemamba.ops.selective_scan import _resolve_impl

    assert _resolve_impl("auto", torch.device("cpu")) == expected


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
    assert set(IMPLS) == {"auto", "ref", "cpu", "torch", "triton"}


def test_fallback_when_compiler_missing(monkeypatch, tmp_path):
    """No compiler: one warning, cpu_scan_available() is False, "auto" still works via "torch"."""
    monkeypatch.setattr(cpu_scan, "_lib", None)
    monkeypatch.setattr(cpu_scan, "_load_error", None)
    monkeypatch.setenv("CC", "definitely-not-a-compiler")
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not cpu_scan.cpu_scan_available()
    inputs = make_inputs()
    out = selective_scan(*inputs, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan_ref(*inputs, delta_softplus=True), atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="impl='cpu' unavailable"):
        selective_scan(*inputs, impl="cpu")


def test_build_into_fresh_cache(monkeypatch, tmp_path):
    """A fresh cache directory gets one library file (no temp files left) that loads and runs."""
    if cpu_scan.shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_scan, "_lib", None)
    monkeypatch.setattr(cpu_scan, "_load_error", None)
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path))
    assert cpu_scan.cpu_scan_available()
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) == 1 and files[0].startswith("selective_scan_") and files[0].endswith(".so"), files
    _compare("cpu", torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10)
