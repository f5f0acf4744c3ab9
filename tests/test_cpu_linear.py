"""ops/cpu_linear.py: the mixer's in_proj / out_proj through oneDNN or the BLAS, as SHUFFLEMAMBA_CPU_GEMM says.

Every result is held against F.linear in float64; no timing is asserted (the measured choice is only
checked to be recorded and read back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from shufflemamba.ops import config, cpu_linear

needs_onednn = pytest.mark.skipif(cpu_linear._onednn_linear() is None, reason="this torch has no oneDNN linear")


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path))
    cpu_linear._choice.cache_clear()
    yield
    cpu_linear._choice.cache_clear()


def _inputs(shape, bias: bool, seed: int = 0, out_features: int = 80):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 48, generator=g, requires_grad=True)
    w = (torch.randn(out_features, 48, generator=g) / 7).requires_grad_()
    b = torch.randn(out_features, generator=g).requires_grad_() if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("backend", ["onednn", "blas"])
@pytest.mark.parametrize("shape", [(2, 17), (37,), (3, 5, 4)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [80, 24])  # wider and narrower than the input: both weight-gradient forms
def test_linear_matches_float64_forward_and_every_gradient(monkeypatch, backend, shape, bias, out_features):
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_GEMM", backend)
    assert cpu_linear.gemm_backend() == backend
    x, w, b = _inputs(shape, bias, out_features=out_features)
    y = cpu_linear.linear(x, w, b)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(gy)
    leaves = [t for t in (x, w, b) if t is not None]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y64 = F.linear(*ref[:2], ref[2] if bias else None)
    y64.backward(gy.double())
    assert y.shape == y64.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for t, r in zip(leaves, ref):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the inference call (no autograd Function) gives the same numbers
        torch.testing.assert_close(cpu_linear.linear(x, w, b), y, rtol=0, atol=0)


@needs_onednn
@pytest.mark.parametrize("weight_grad", ["onednn", "blas"])
def test_recorded_weight_gradient_library_gives_the_float64_gradient(monkeypatch, weight_grad):
    """auto with a record: oneDNN forward, the weight gradient on the recorded library; both hold against float64."""
    monkeypatch.delenv("SHUFFLEMAMBA_CPU_GEMM", raising=False)
    path = cpu_linear.gemm_choice_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"backend": "onednn", "weight_grad": weight_grad, "ms": {}}))
    assert cpu_linear.gemm_choice() == ("onednn", weight_grad)
    x, w, b = _inputs((2, 9), True)
    gy = torch.randn(2, 9, 80, generator=torch.Generator().manual_seed(2))
    cpu_linear.linear(x, w, b).backward(gy)
    w64 = w.detach().double().requires_grad_()
    F.linear(x.detach().double(), w64).backward(gy.double())
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)
    assert f"weight gradients on {dict(onednn='oneDNN', blas='torch' + chr(39) + 's BLAS')[weight_grad]} (" in \
        cpu_linear.describe_gemm()


@needs_onednn
def test_onednn_runs_the_product_and_non_float32_falls_back(monkeypatch):
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_GEMM", "onednn")
    x, w, _ = _inputs((4,), False)
    y = cpu_linear.linear(x, w)
    assert type(y.grad_fn).__name__.startswith("_OneDNNLinear")
    y64 = cpu_linear.linear(x.double(), w.double())  # oneDNN's linear is float32 here: F.linear runs
    assert type(y64.grad_fn).__name__ != type(y.grad_fn).__name__ and y64.dtype == torch.float64
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_GEMM", "blas")
    cpu_linear._choice.cache_clear()
    assert not type(cpu_linear.linear(x, w).grad_fn).__name__.startswith("_OneDNNLinear")


@needs_onednn
def test_auto_measures_once_and_records_the_choice(monkeypatch):
    monkeypatch.delenv("SHUFFLEMAMBA_CPU_GEMM", raising=False)
    path = cpu_linear.gemm_choice_path()
    assert not path.exists()
    first = cpu_linear.gemm_backend()
    rec = json.loads(path.read_text())
    assert rec["backend"] == first and rec["weight_grad"] in ("onednn", "blas") and rec["threads"] == torch.get_num_threads()
    assert set(rec["ms"]) == {"blas", "onednn", "blas_weight_grad", "onednn_weight_grad"}
    path.write_text(json.dumps({**rec, "backend": "blas" if first == "onednn" else "onednn"}))  # another record
    cpu_linear._choice.cache_clear()
    assert cpu_linear.gemm_backend() != first  # read back, not measured again
    path.write_text("not json")
    cpu_linear._choice.cache_clear()
    assert cpu_linear.gemm_backend() in ("onednn", "blas") and json.loads(path.read_text())["backend"]


def test_bad_setting_is_one_error_line_from_the_command(monkeypatch, tmp_path):
    with monkeypatch.context() as m:
        m.setenv("SHUFFLEMAMBA_CPU_GEMM", "mkl")
        with pytest.raises(config.KernelConfigError, match="must be onednn, blas or auto, got 'mkl'"):
            cpu_linear.gemm_backend()
    out = subprocess.run([sys.executable, "-m", "shufflemamba", "train", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, env={**os.environ, "SHUFFLEMAMBA_CPU_GEMM": "mkl"}, timeout=300)
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.strip().splitlines() == ["error: SHUFFLEMAMBA_CPU_GEMM must be onednn, blas or auto, got 'mkl'"]


@needs_onednn
def test_autocast_keeps_torchs_linear(monkeypatch):
    """Under CPU autocast the product runs as autocast casts it (bfloat16 out), not through oneDNN in float32."""
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_GEMM", "onednn")
    x, w, _ = _inputs((4,), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_linear.linear(x, w).dtype == F.linear(x, w).dtype == torch.bfloat16


@needs_onednn
def test_strided_weight_and_bias_views_give_the_product(monkeypatch):
    """A transposed (tied) weight and a strided bias, as views: oneDNN gets dense copies, gradients reach the bases."""
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_GEMM", "onednn")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 48, generator=g)
    w_base = torch.randn(48, 80, generator=g, requires_grad=True)
    b_base = torch.randn(160, generator=g, requires_grad=True)
    y = cpu_linear.linear(x, w_base.t(), b_base[::2])
    y.sum().backward()
    torch.testing.assert_close(y, F.linear(x, w_base.t(), b_base[::2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_base.grad, x.sum(0)[:, None].expand(48, 80), rtol=1e-5, atol=1e-5)
    assert b_base.grad[::2].eq(5).all() and b_base.grad[1::2].eq(0).all()
