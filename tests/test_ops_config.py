"""The CPU kernels' settings (ops/config.py): environment variables, their errors, the CPU's description."""

from __future__ import annotations

from pathlib import Path

import pytest

from shufflemamba.ops import config, cpu_library, cpu_scan


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path / "c"))
    assert config.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SHUFFLEMAMBA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert config.cache_dir() == Path(tmp_path) / "shufflemamba"


@pytest.mark.parametrize("value, disabled", [("", False), ("0", False), ("1", True), ("yes", True)])
def test_no_compile(monkeypatch, value, disabled):
    monkeypatch.setenv("SHUFFLEMAMBA_NO_COMPILE", value)
    assert config.compile_disabled() is disabled


@pytest.mark.parametrize("value, expected", [("", "auto"), (" AUTO ", "auto"), ("256", "256"), ("512", "512")])
def test_vector_width_values(monkeypatch, value, expected):
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_VECTOR_WIDTH", value)
    assert config.vector_width() == expected


def test_bad_vector_width_is_one_error_line_from_the_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cpu_library, "_lib", None)  # a fresh process: the setting is read at the first load
    monkeypatch.setattr(cpu_library, "_load_error", None)
    monkeypatch.setenv("SHUFFLEMAMBA_CACHE", str(tmp_path))
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_VECTOR_WIDTH", "128")
    with pytest.raises(config.KernelConfigError, match="must be 256, 512 or auto, got '128'"):
        config.vector_width()
    assert cpu_scan.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SHUFFLEMAMBA_CPU_VECTOR_WIDTH") and err.count("\n") == 1


@pytest.mark.parametrize("lines, isa, avx512", [
    (["flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n"], "AVX-512", True),
    (["flags\t\t: fpu sse2 avx avx2 fma\n"], "AVX2", False),
    (["Features\t: fp asimd evtstrm aes\n"], "NEON", False),
])
def test_vector_isa_from_cpuinfo(monkeypatch, lines, isa, avx512):
    monkeypatch.delenv(config.ISA_ENV, raising=False)  # the CPU's own ISA, not a cap set for this run
    monkeypatch.setattr(config, "_cpuinfo_lines", lambda: ["model name\t: Some CPU 9000\n", *lines])
    assert config.vector_isa() == isa and config.has_avx512() is avx512
    assert config.cpu_model() == "Some CPU 9000"
    assert lines[0] in config.cpu_signature()
