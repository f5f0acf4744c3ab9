"""The glue to mamba_ssm's selective scan and causal-conv1d, tested on the CPU.

Neither package builds without CUDA, so pure-PyTorch stand-ins with their published signatures and
the dtype checks of their kernels are put in ``sys.modules``: argument order, dtype rules, the
reverse direction and gradients are checked against our reference through them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.ops import mamba_ssm_glue, selective_scan, selective_scan_ref
from shufflemamba.ops.selective_scan import resolve_impl

HALF_OK = (torch.float32, torch.float16, torch.bfloat16)


class FakeKernels:
    """Stand-ins for ``mamba_ssm.ops.selective_scan_interface`` and ``causal_conv1d``.

    They check what the CUDA kernels check (``TORCH_CHECK``s of selective_scan.cpp and
    causal_conv1d.cpp), compute in float32 outside autocast as the kernels do, and log each call.
    """

    def __init__(self) -> None:
        self.scan_calls: list[dict] = []
        self.conv_calls: list[dict] = []

    def selective_scan_fn(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        assert u.dtype in HALF_OK, f"input type {u.dtype}"
        assert A.dtype == torch.float32, f"weight type {A.dtype}"
        assert delta.dtype == u.dtype, "delta.scalar_type() == input_type"
        assert B.dim() == 3 and B.dtype == u.dtype, "B.scalar_type() == input_type"
        assert C.dim() == 3 and C.dtype == u.dtype, "C.scalar_type() == input_type"
        assert z is None or z.dtype == u.dtype, "z.scalar_type() == input_type"
        assert D is None or D.dtype == torch.float32, "D.scalar_type() == Float"
        assert delta_bias is None or delta_bias.dtype == torch.float32, "delta_bias.scalar_type() == Float"
        self.scan_calls.append(dict(u=u.detach().clone(), dtypes={k: (t.dtype if t is not None else None) for k, t in
                                    dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias).items()},
                                    delta_softplus=delta_softplus))
        with torch.autocast(u.device.type, enabled=False):  # a CUDA kernel, outside autocast
            dlt = delta.float()
            if delta_bias is not None:
                dlt = dlt + delta_bias[:, None]
            if delta_softplus:
                dlt = F.softplus(dlt)
            h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, E, N), float32 state
            ys = []
            for d_t, u_t, b_t, c_t in zip(dlt.unbind(-1), u.float().unbind(-1), B.float().unbind(-1),
                                          C.float().unbind(-1)):
                h = torch.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
                ys.append((h * c_t[:, None, :]).sum(-1))
            y = torch.stack(ys, -1)
            if D is not None:
                y = y + u.float() * D[:, None]
            if z is not None:
                y = y * F.silu(z.float())
            out = y.to(u.dtype)
        return (out, h) if return_last_state else out

    def causal_conv1d_fn(self, x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError("activation must be None, silu, or swish")
        assert x.dim() == 3 and weight.dim() == 2 and weight.shape[0] == x.shape[1], "CHECK_SHAPE(weight, dim, width)"
        assert 2 <= weight.shape[1] <= 4, "causal_conv1d only supports width between 2 and 4"
        assert x.stride(2) == 1 or x.stride(1) == 1
        self.conv_calls.append(dict(x=x.detach().clone(), x_stride_l=x.stride(-1), weight_shape=tuple(weight.shape),
                                    x_dtype=x.dtype, weight_dtype=weight.dtype, activation=activation))
        with torch.autocast(x.device.type, enabled=False):
            width = weight.shape[1]
            out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])
            out = out[..., : x.shape[-1]]
            out = F.silu(out) if activation else out
        return out.to(x.dtype)


@pytest.fixture
def fakes(monkeypatch):
    """Install the stand-ins as the real packages' module paths; forget them afterwards."""
    k = FakeKernels()
    pkg, ops, iface, cc = (types.ModuleType(n) for n in
                           ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "causal_conv1d"))
    iface.selective_scan_fn = k.selective_scan_fn
    cc.causal_conv1d_fn = k.causal_conv1d_fn
    pkg.ops, ops.selective_scan_interface = ops, iface
    for mod in (pkg, ops, iface, cc):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    mamba_ssm_glue.reset()
    # the glue's one trial call (it only trusts a kernel that ran); the tests count the calls after it
    assert mamba_ssm_glue.mamba_ssm_scan("cpu") is not None
    k.scan_calls.clear()
    yield k
    mamba_ssm_glue.reset()


def _install_scan(monkeypatch, selective_scan_fn):
    """Put a ``mamba_ssm.ops.selective_scan_interface`` with this ``selective_scan_fn`` in sys.modules."""
    pkg, ops, iface = (types.ModuleType(n) for n in
                       ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"))
    iface.selective_scan_fn = selective_scan_fn
    pkg.ops, ops.selective_scan_interface = ops, iface
    for mod in (pkg, ops, iface):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    mamba_ssm_glue.reset()


@pytest.fixture
def no_kernels(monkeypatch):
    """Make both packages fail to import, whatever is installed."""
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "causal_conv1d"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import raises ImportError
    mamba_ssm_glue.reset()
    yield
    mamba_ssm_glue.reset()


def make_inputs(batch=2, E=6, L=11, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    return dict(u=r(batch, E, L), delta=0.5 * r(batch, E, L), A=A, B=r(batch, N, L), C=r(batch, N, L),
                D=r(E), z=r(batch, E, L), delta_bias=0.3 * r(E) - 2.0)


def grads_of(fn, inputs, gout):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    out.backward(gout)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_mamba_ssm_impl_matches_reference(fakes, reverse):
    """Output and all eight gradients equal the reference's; reverse == flip, scan, flip back."""
    inputs = make_inputs()
    gout = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(1))
    timed = ("u", "delta", "B", "C", "z")

    def ref(**kw):
        if reverse:
            kw = {k: (v.flip(-1) if k in timed else v) for k, v in kw.items()}
            return selective_scan_ref(**kw, delta_softplus=True).flip(-1)
        return selective_scan_ref(**kw, delta_softplus=True)

    out_ref, g_ref = grads_of(ref, inputs, gout)
    out, g = grads_of(lambda **kw: selective_scan(**kw, delta_softplus=True, impl="mamba_ssm", reverse=reverse),
                      inputs, gout)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"grad {k}: {m}")
    assert len(fakes.scan_calls) == 1 and fakes.scan_calls[0]["delta_softplus"] is True
    u_seen = fakes.scan_calls[0]["u"]
    torch.testing.assert_close(u_seen, inputs["u"].flip(-1) if reverse else inputs["u"])


def test_dtype_rules_bf16(fakes):
    """bf16 activations with a float32 delta and a bf16 A (a mix a caller may pass): the kernel gets
    delta, B, C, z in u's dtype and A, D, delta_bias in float32; gradients come back in each input's
    own dtype; the output is bf16 and close to the float32 reference on the same rounded inputs."""
    inputs = make_inputs(seed=3)
    bf = {k: (v.bfloat16() if k in ("u", "B", "C", "z", "A") else v) for k, v in inputs.items()}
    gout = torch.randn(2, 6, 11).bfloat16()
    out, g = grads_of(lambda **kw: selective_scan(**kw, delta_softplus=True, impl="mamba_ssm"), bf, gout)
    seen = fakes.scan_calls[0]["dtypes"]
    assert {k: seen[k] for k in ("u", "delta", "B", "C", "z")} == dict.fromkeys(("u", "delta", "B", "C", "z"),
                                                                              torch.bfloat16)
    assert {k: seen[k] for k in ("A", "D", "delta_bias")} == dict.fromkeys(("A", "D", "delta_bias"), torch.float32)
    assert out.dtype == torch.bfloat16
    for k, v in bf.items():
        assert g[k].dtype == v.dtype, k
    ref = selective_scan_ref(**{k: v.float() for k, v in bf.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)


def test_float64_and_missing_package_raise(fakes, monkeypatch):
    inputs = make_inputs()
    with pytest.raises(TypeError, match="float64"):
        selective_scan(**{k: v.double() for k, v in inputs.items()}, impl="mamba_ssm")
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)
    mamba_ssm_glue.reset()
    with pytest.raises(RuntimeError, match="impl='mamba_ssm' unavailable"):
        selective_scan(**inputs, impl="mamba_ssm")
    assert "None in sys.modules" in mamba_ssm_glue.status()["mamba_ssm"]  # the reason is kept


def test_auto_prefers_mamba_ssm_on_cuda_only(fakes):
    """The rule in resolve_impl: CUDA -> mamba_ssm when it imports (not for float64); CPU never."""
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, torch.bfloat16) == "mamba_ssm"
    assert resolve_impl("auto", cuda, torch.float32) == "mamba_ssm"
    assert resolve_impl("auto", cuda, torch.float64) == "torch"  # neither GPU kernel takes float64
    assert resolve_impl("auto", torch.device("cpu")) in ("cpu", "torch")


def test_mamba_ssm_that_imports_but_cannot_run_is_unavailable(monkeypatch):
    """A mamba_ssm built without its CUDA extension (state-spaces/mamba#977): the module imports and
    has selective_scan_fn, but calling it raises. It must not count as available: "auto" keeps our
    kernels, impl='mamba_ssm' raises with the reason, and the trial call runs once, not per query."""
    calls = []

    def no_kernel(u, *args, **kwargs):
        calls.append(u.device)
        raise NameError("name 'selective_scan_cuda' is not defined")

    _install_scan(monkeypatch, no_kernel)
    try:
        assert mamba_ssm_glue.mamba_ssm_scan() is None
        why = mamba_ssm_glue.status()["mamba_ssm"]
        assert "raised" in why and "selective_scan_cuda" in why
        assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) in ("triton", "torch")
        with pytest.raises(RuntimeError, match="impl='mamba_ssm' unavailable.*selective_scan_cuda"):
            selective_scan(**make_inputs(), impl="mamba_ssm")
        assert len(calls) == 1  # cached: four queries, one trial
    finally:
        mamba_ssm_glue.reset()


def test_mamba_ssm_that_runs_wrong_is_unavailable(monkeypatch):
    _install_scan(monkeypatch, lambda u, *args, **kwargs: torch.zeros_like(u))
    try:
        assert mamba_ssm_glue.mamba_ssm_scan("cpu") is None
        assert "disagrees with the reference" in mamba_ssm_glue.status("cpu")["mamba_ssm"]
    finally:
        mamba_ssm_glue.reset()


def test_mamba_ssm_that_runs_is_available_after_one_trial_per_device(monkeypatch):
    """A working selective_scan_fn (the stand-in) counts once its trial call matched the reference;
    the trial is cached per device, and reset() forgets it."""
    k = FakeKernels()
    _install_scan(monkeypatch, k.selective_scan_fn)
    try:
        assert mamba_ssm_glue.mamba_ssm_scan("cpu") == k.selective_scan_fn
        assert mamba_ssm_glue.mamba_ssm_scan() == k.selective_scan_fn  # default device here: the CPU
        assert mamba_ssm_glue.status("cpu")["mamba_ssm"] == "ok"
        assert len(k.scan_calls) == 1
        assert k.scan_calls[0]["dtypes"]["u"] == torch.float32 and k.scan_calls[0]["delta_softplus"]
        mamba_ssm_glue.reset()
        assert mamba_ssm_glue.mamba_ssm_scan("cpu") == k.selective_scan_fn
        assert len(k.scan_calls) == 2
    finally:
        mamba_ssm_glue.reset()


def test_auto_without_kernels_keeps_triton_or_torch(no_kernels):
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) in ("triton", "torch")
    assert mamba_ssm_glue.mamba_ssm_scan() is None and mamba_ssm_glue.causal_conv1d() is None


def _mixer_grads(mixer, hidden, gout):
    h = hidden.detach().clone().requires_grad_()
    out = mixer(h)
    grads = torch.autograd.grad(out, [h, *mixer.parameters()], gout)
    return out.detach(), grads


def test_mixer_through_both_kernels_matches_reference(fakes):
    """A whole bidirectional mixer on causal_conv1d_fn + selective_scan_fn: both directions (the
    reverse one on flipped copies), output and every parameter gradient equal the reference path."""
    from shufflemamba.models import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4, scan_impl="mamba_ssm")
    hidden = torch.randn(2, 9, 16)
    gout = torch.randn(2, 9, 16)
    out, grads = _mixer_grads(mixer, hidden, gout)
    assert len(fakes.conv_calls) == 2 and len(fakes.scan_calls) == 2
    for call in fakes.conv_calls:
        assert call["activation"] == "silu" and call["weight_shape"] == (32, 4) and call["x_stride_l"] == 1
    # the second direction's conv saw the sequence reversed
    x_fwd, x_bwd = (c["x"] for c in fakes.conv_calls)
    torch.testing.assert_close(x_bwd, x_fwd.flip(-1))
    mixer.scan_impl = "ref"
    ref, ref_grads = _mixer_grads(mixer, hidden, gout)
    assert len(fakes.conv_calls) == 2  # the reference path does not touch causal-conv1d
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for (name, _), g, rg in zip([("hidden", None), *mixer.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_mixer_lays_out_xz_as_official_vim_for_mamba_ssm(fakes, monkeypatch):
    """On mamba_ssm's stack xz is built (B, 2E, L) with L contiguous: the forward direction's conv
    input is a view of it, not a copy of a transposed channel-last tensor."""
    from shufflemamba.models import BiMambaMixer

    mixer = BiMambaMixer(16, d_state=4, scan_impl="mamba_ssm")
    seen = []
    real = fakes.causal_conv1d_fn
    monkeypatch.setattr(fakes, "causal_conv1d_fn", lambda x, *a, **k: (seen.append(x), real(x, *a, **k))[1])
    import causal_conv1d

    monkeypatch.setattr(causal_conv1d, "causal_conv1d_fn", fakes.causal_conv1d_fn)
    mamba_ssm_glue.reset()
    mixer(torch.randn(2, 9, 16))
    assert seen and seen[0]._base is not None and seen[0].stride() == (2 * 32 * 9, 9, 1)


def test_auto_mixer_on_cpu_ignores_kernels(fakes):
    from shufflemamba.models import BiMambaMixer

    mixer = BiMambaMixer(16, d_state=4)
    mixer(torch.randn(1, 5, 16))
    assert fakes.conv_calls == [] and fakes.scan_calls == []


def test_bf16_autocast_keeps_fp32_parameters_state_and_residual(fakes):
    """Under bf16 autocast (the CUDA training default; CPU autocast stands in here) the kernels get
    bf16 activations with float32 A, D, dt bias and conv weight, the residual stream stays float32,
    and the logits are close to the float32 model's."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, depth=2, num_classes=5, embed_dim=32,
                              scan_impl="mamba_ssm")
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    residuals = []
    hook = model.layers[-1].register_forward_hook(lambda m, i, o: residuals.append(o[1].dtype))
    fakes.scan_calls.clear()
    fakes.conv_calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    hook.remove()
    assert residuals == [torch.float32]
    assert len(fakes.scan_calls) == 4  # 2 blocks x 2 directions
    for call in fakes.scan_calls:
        assert call["dtypes"]["u"] == torch.bfloat16 and call["dtypes"]["delta"] == torch.bfloat16
        assert call["dtypes"]["A"] == call["dtypes"]["D"] == call["dtypes"]["delta_bias"] == torch.float32
    for call in fakes.conv_calls:
        assert call["x_dtype"] == torch.bfloat16 and call["weight_dtype"] == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.1 * ref.abs().max().item(), rtol=0)
    out.float().sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_importing_shufflemamba_imports_neither_package(tmp_path):
    """Poisoned packages named mamba_ssm / causal_conv1d on the path record any import. Importing
    shufflemamba and running a model on the CPU must not trigger them; asking for impl='mamba_ssm'
    does (the control that shows the poison works)."""
    for name in ("mamba_ssm", "causal_conv1d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"open({str(tmp_path / (name + '.imported'))!r}, 'w').close()\nraise ImportError('poisoned')\n")
    code = textwrap.dedent("""
        import sys, torch, shufflemamba, timm
        assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules
        m = timm.create_model("vim_tiny_patch16_224", img_size=32, depth=2, num_classes=3, embed_dim=32)
        m(torch.randn(1, 3, 32, 32)).sum().backward()
        print("clean")
        from shufflemamba.ops import selective_scan
        u = torch.randn(1, 4, 5)
        try:
            selective_scan(u, u, -torch.ones(4, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5), impl="mamba_ssm")
        except RuntimeError as e:
            print("unavailable:", e)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "clean"
    assert "poisoned" in lines[1]
    assert (tmp_path / "mamba_ssm.imported").exists()  # only after the explicit request


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_gpu_real_mamba_ssm_matches_reference(dtype, tol):
    """The installed mamba_ssm kernel through our glue, Vim-S shape, both directions, vs the reference."""
    mamba_ssm_glue.reset()
    if mamba_ssm_glue.mamba_ssm_scan() is None:
        pytest.skip(f"mamba_ssm does not import here ({mamba_ssm_glue.status()['mamba_ssm']})")
    inputs = {k: v.cuda() for k, v in make_inputs(batch=4, E=768, L=197, N=16, seed=7).items()}
    inputs = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    gout = torch.randn(4, 768, 197, device="cuda").to(dtype)
    for reverse in (False, True):
        ref, g_ref = grads_of(lambda **kw: selective_scan(**{k: v.double() for k, v in kw.items()}, delta_softplus=True,
                                                          impl="ref", reverse=reverse), inputs, gout.double())
        out, g = grads_of(lambda **kw: selective_scan(**kw, delta_softplus=True, impl="mamba_ssm", reverse=reverse),
                          inputs, gout)
        for name, x, r in [("out", out, ref), *((k, g[k], g_ref[k]) for k in g)]:
            err = (x.double() - r).abs().max().item() / r.abs().max().item()
            assert err < tol, (reverse, name, err)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_mixer_auto_under_bf16_autocast_matches_fp32():
    """The CUDA mixer path "auto" takes (mamba_ssm + causal-conv1d where installed, else Triton) under
    bf16 autocast, against the same mixer in fp32 on the pure-PyTorch scan."""
    from shufflemamba.models import BiMambaMixer

    mamba_ssm_glue.reset()
    torch.manual_seed(0)
    mixer = BiMambaMixer(384).cuda()
    hidden = torch.randn(4, 197, 384, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mixer(hidden)
    mixer.scan_impl = "torch"
    ref = mixer(hidden)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err < 5e-2, err
