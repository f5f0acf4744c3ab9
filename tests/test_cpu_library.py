"""Building, caching and loading the compiled CPU kernels (ops/cpu_library.py): no compiler, a fresh
cache, and the vector width (SHUFFLEMAMBA_CPU_VECTOR_WIDTH, the default per CPU, a recorded choice)."""

from __future__ import annotations

import shutil

import pytest
import torch

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.ops import config, cpu_library, cpu_scan, selective_scan, selective_scan_ref

from scan_cases import compare_to_reference, make_inputs


def test_fallback_when_compiler_missing(monkeypatch, tmp_path):
    """No compiler: one warning, cpu_scan_available() is False, "auto" still works via "torch"."""
    monkeypatch.setattr(cpu_library, "_lib", None)
    monkeypatch.setattr(cpu_library, "_load_error", None)
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
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_library, "_lib", None)
    monkeypatch.setattr(cpu_library, "_load_error", None)
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path))
    monkeypatch.delenv("SHUFFLEMAMBA_CPU_VECTOR_WIDTH", raising=False)  # auto: one build, nothing measured
    assert cpu_scan.cpu_scan_available()
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) == 1 and files[0].startswith("selective_scan_") and files[0].endswith(".so"), files
    compare_to_reference("cpu", torch.float64, (True, True, True, True), atol=1e-10, rtol=1e-10)


# --- vector width: SHUFFLEMAMBA_CPU_VECTOR_WIDTH, the default and a recorded choice (cpu_library) ---


@pytest.fixture(scope="module")
def width_cache(tmp_path_factory):
    """One cache directory for the width tests, so each variant is built once."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return tmp_path_factory.mktemp("width_cache")


def _fresh_load(monkeypatch, cache, width=None):
    monkeypatch.setattr(cpu_library, "_lib", None)
    monkeypatch.setattr(cpu_library, "_load_error", None)
    monkeypatch.setattr(cpu_library, "_width_info", None)
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(cache))
    if width is None:
        monkeypatch.delenv("SHUFFLEMAMBA_CPU_VECTOR_WIDTH", raising=False)
    else:
        monkeypatch.setenv("SHUFFLEMAMBA_CPU_VECTOR_WIDTH", width)
    assert cpu_scan.cpu_scan_available(), cpu_library._load_error
    return cpu_scan.vector_width_info()


def _scan_cl_fp32():
    u, delta, A, B, C, Dv, zv, bv = make_inputs(batch=2, E=70, L=9, N=4, dtype=torch.float32)
    cl = [u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), Dv, zv.transpose(1, 2), bv]
    leaves = [t.detach().contiguous().requires_grad_() for t in cl]
    out = cpu_scan.selective_scan_cl(*leaves, delta_softplus=True)
    return [out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out))]


def test_vector_width_env_override_is_honoured(monkeypatch, width_cache):
    if not config.is_x86():
        pytest.skip("the width flag is x86-only")
    results, libs = {}, {}
    for width in ("256", "512"):
        info = _fresh_load(monkeypatch, width_cache, width)
        assert info["width"] == int(width) and info["source"] == "SHUFFLEMAMBA_CPU_VECTOR_WIDTH"
        libs[width] = cpu_library._lib._name
        results[width] = _scan_cl_fp32()
    assert libs["256"] != libs["512"]  # two builds, the width in the cache key
    for a, b in zip(results["256"], results["512"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not list(width_cache.glob("vector_width_*.json"))  # a forced width measures nothing


def test_vector_width_bad_value_is_a_kernel_config_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_library, "_lib", None)
    monkeypatch.setattr(cpu_library, "_load_error", None)
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path))
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_VECTOR_WIDTH", "1024")
    with pytest.raises(config.KernelConfigError, match="SHUFFLEMAMBA_CPU_VECTOR_WIDTH must be 256, 512 or auto"):
        cpu_library.load_library()
    assert issubclass(config.KernelConfigError, ValueError)


def test_vector_width_choice_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "vector_width_x.json"
    rec = {"width": 256, "ms": {"256": 1.0, "512": 1.5}, "cpu": "X"}
    cpu_library.write_choice(path, rec)
    assert cpu_library.read_choice(path) == rec
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    path.write_text('{"width": 51')  # torn or corrupt: the default applies rather than trusting it
    assert cpu_library.read_choice(path) is None
    path.write_text('{"width": 128}')
    assert cpu_library.read_choice(path) is None
    assert cpu_library.read_choice(tmp_path / "missing.json") is None


@pytest.mark.parametrize("recorded", [None, "256", "512"])
def test_vector_width_auto_is_one_build_the_record_or_512(monkeypatch, width_cache, recorded):
    """auto on an AVX-512 CPU builds one variant and times nothing: the recorded width when a
    measurement was recorded for this CPU, compiler and sources, else 512."""
    if not config.is_x86():
        pytest.skip("the width flag is x86-only")
    monkeypatch.setattr(config, "has_avx512", lambda: True)
    monkeypatch.setattr(cpu_scan, "measure_vector_width", lambda *a, **k: pytest.fail("measured at load"))
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(width_cache))
    path = cpu_library.choice_path(shutil.which(config.compiler()))
    path.unlink(missing_ok=True)
    if recorded:
        cpu_library.write_choice(path, {"width": int(recorded), "ms": {"256": 1.0, "512": 1.0}})
    info = _fresh_load(monkeypatch, width_cache)
    assert info["width"] == int(recorded or 512)
    assert info["source"] == ("recorded" if recorded else "default on AVX-512")
    assert str(info["width"]) in cpu_scan.describe_vector_width()
    assert cpu_library.state_loop_bits(cpu_library._lib) in (0, info["width"])
    path.unlink(missing_ok=True)
    assert torch.isfinite(_scan_cl_fp32()[0]).all()


@pytest.mark.parametrize("avx2", [True, False])
def test_vector_width_without_avx512(monkeypatch, width_cache, avx2):
    """Without AVX-512: the explicit 256-bit loops where there are AVX2 and FMA, else the compiler's default
    vectors (the generic loops)."""
    if not config.is_x86():
        pytest.skip("the width flag is x86-only")
    monkeypatch.setattr(config, "has_avx512", lambda: False)
    monkeypatch.setattr(config, "has_avx2_fma", lambda: avx2)
    info = _fresh_load(monkeypatch, width_cache)
    if avx2:
        assert info["width"] == 256 and "AVX2 + FMA" in info["source"]
    else:
        assert info["width"] is None and "compiler default" in info["source"]


def test_measure_vector_width_records_a_choice_that_auto_loads(monkeypatch, width_cache):
    """``python -m shufflemamba.ops.cpu_scan --measure`` runs both builds through the real kernels
    and records one width, which the next load reads (the times themselves are not checked)."""
    if not (config.is_x86() and config.has_avx512()):
        pytest.skip("one width without AVX-512")
    _fresh_load(monkeypatch, width_cache, "512")
    rec = cpu_scan.measure_vector_width(rounds=1, reps=1)
    assert rec["width"] in (256, 512) and set(rec["ms"]) == {"256", "512"}
    info = _fresh_load(monkeypatch, width_cache)
    assert info["source"] == "recorded" and info["width"] == rec["width"]
    cpu_library.choice_path(shutil.which(config.compiler())).unlink()
