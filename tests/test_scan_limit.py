"""benchmarks/scan_limit.py: the peak rates are measured on the widest vectors the build has.

No timing is asserted: the rates are only checked to be positive; what is checked is which vectors and
which exp the peak build uses, for the CPU's own features and with AVX-512 switched off (--isa avx2)."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch

from shufflemamba.ops import config as ops_config
from shufflemamba.ops import cpu_library

ROOT = Path(__file__).resolve().parent.parent


def _module():
    if str(ROOT / "benchmarks") not in sys.path:  # the script imports its sibling docs_section, as when run
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("scan_limit", ROOT / "benchmarks" / "scan_limit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return {w for ln in f if ln.startswith(("flags", "Features")) for w in ln.split(":", 1)[1].split()}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def _needs_cc():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def test_peak_build_uses_the_widest_vectors_of_this_cpu(monkeypatch):
    monkeypatch.delenv(ops_config.ISA_ENV, raising=False)
    mod = _module()
    lib = mod.build_peak(None)
    flags = _cpu_flags()
    expected = {True: 512, False: 256 if "avx" in flags else 128}["avx512f" in flags] if _x86() else 128
    assert lib.fma_bits() == expected
    if _x86() and "avx512f" not in flags and {"avx2", "fma"} <= flags:
        assert lib.fma_isa() == b"AVX2+FMA"
    assert lib.exp_path() == 0  # no width flag: the generic sm_exp2f loop
    assert lib.fma_rate(1000, 1) > 0 and lib.exp_rate(100, 1) > 0


def test_peak_build_with_avx512_off(monkeypatch):
    """--isa avx2 on an AVX-512 machine: 256-bit FMAs and the AVX2 path's exp, even with a 512-bit width
    asked for (the width flag then has no 512-bit vectors to use)."""
    flags = _cpu_flags()
    if not _x86() or "avx512f" not in flags:
        pytest.skip("needs an x86 CPU with AVX-512")
    monkeypatch.delenv(ops_config.ISA_ENV, raising=False)
    mod = _module()
    native = mod.build_peak(512)
    assert (native.fma_bits(), native.fma_isa(), native.exp_path()) == (512, b"AVX-512", 512)
    monkeypatch.setenv(ops_config.ISA_ENV, "avx2")
    capped = mod.build_peak(512)
    assert (capped.fma_bits(), capped.fma_isa()) == (256, b"AVX2+FMA")
    assert capped.exp_path() == 0
    assert capped.fma_rate(1000, 1) > 0 and capped.exp_rate(100, 1) > 0


def test_bad_isa_setting_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setenv(ops_config.ISA_ENV, "sse9")
    with pytest.raises(SystemExit) as exc:
        _module().main(["--threads", "1"])
    assert str(exc.value).startswith("error: SHUFFLEMAMBA_CPU_ISA must be native or avx2")


def test_limit_is_the_arithmetic_at_the_peak_rates():
    mod = _module()
    shape = {"batch": 1, "E": 1, "L": 1, "N": 16}
    rates = {"fma_per_s": 1e9, "exp_per_s": 1e8}
    lim = mod.limit_ms(shape, rates)
    fwd = mod.OPS["forward"]
    expected = 1e3 * 16 * ((fwd["exp"] + fwd["exp_per_channel"] / 16) / 1e8 + (fwd["ops"] + fwd["ops_per_channel"] / 16) / 1e9)
    assert lim["forward"] == pytest.approx(expected)
    assert lim["total"] == pytest.approx(lim["forward"] + lim["backward"])


def test_measure_takes_the_best_round_of_each_side():
    """Peak rates and scan times are taken in turn, round by round; a round slowed by a neighbour (the
    FMA rate halved here) does not set the limit."""
    mod = _module()

    class Rates:  # the peak library's interface, with a slow second round
        def __init__(self):
            self.fma, self.exp = iter([9.0, 100.0, 50.0, 100.0]), iter([9.0, 10.0, 10.0, 5.0])

        def fma_rate(self, iters, threads):
            return next(self.fma)

        def exp_rate(self, iters, threads):
            return next(self.exp)

    threads = torch.get_num_threads()
    try:
        rates, ms = mod.measure(Rates(), {"batch": 1, "E": 16, "L": 8, "N": 4}, threads=threads, repeat=3)
    finally:
        torch.set_num_threads(threads)  # the script sets its --threads
    assert rates == {"fma_per_s": 100.0, "exp_per_s": 10.0}  # warm-up rounds (9.0) not counted
    assert ms["total"] > 0 and ms["forward"] > 0 and ms["backward"] == ms["total"] - ms["forward"]
