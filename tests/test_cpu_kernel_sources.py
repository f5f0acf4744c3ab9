"""The C sources of the CPU kernels (src/shufflemamba/ops/csrc): every build of them (the generic
body, the explicit AVX-512 paths at both widths, the explicit AVX2 path, AVX-512 switched off, aarch64 by a
cross compiler)
compiles, and their pointwise functions hold float32 accuracy against float64 in each.

The pointwise functions are reached through tests/csrc/rows_probe.c, a test-only library built with
the kernels' flags: the production library exports the kernels and nothing for the tests."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from shufflemamba.ops import config as ops_config
from shufflemamba.ops import cpu_library

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "csrc" / "rows_probe.c"
CROSS_CC = "aarch64-linux-gnu-gcc"


def _cc() -> str:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    return cc


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(ln.startswith("flags") and "avx512f" in ln.split() for ln in f)
    except OSError:
        return False


def _builds() -> list[tuple[str | None, tuple[str, ...]]]:
    """(width, extra flags) of every build this CPU runs: the generic one; with AVX-512 both explicit
    widths, and with AVX-512 off the explicit AVX2 one and the generic one of an AVX2-only CPU's flags;
    on an AVX2-only CPU (or with AVX-512 capped) the explicit AVX2 one."""
    builds: list[tuple[str | None, tuple[str, ...]]] = [(None, ())]
    if platform.machine().lower() in ("x86_64", "amd64"):
        if _has_avx512() and not ops_config.isa_flags():
            builds += [("512", ()), ("256", ()), ("256", ("-mno-avx512f",)), ("512", ("-mno-avx512f",))]
        elif ops_config.has_avx2_fma():
            builds += [("256", ())]
    return builds


def _explicit_bits(width: str | None, extra: tuple[str, ...]) -> int:
    """The explicit state loops' width a build runs (scan_steps.h): AVX-512 at its width flag, AVX2 at 256
    bits, else none (the generic loops)."""
    if width is None:
        return 0
    if _has_avx512() and not ops_config.isa_flags() and not extra:
        return int(width)
    return 256 if width == "256" and ops_config.has_avx2_fma() else 0


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    cc = _cc()
    libs = {}
    for width, extra in _builds():
        path = tmp_path_factory.mktemp("probe") / "probe.so"
        cpu_library.build(cc, path, width, sources=(PROBE,), extra_flags=extra)
        lib = ctypes.CDLL(str(path))
        for name in ("softplus", "sigmoid", "dsoftplus", "gate", "silu", "dsilu"):
            fn = getattr(lib, f"probe_{name}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = ctypes.c_int
        libs[(width, extra)] = lib
    return libs


def test_probe_builds_run_the_expected_state_loops(probes):
    bits = {key: lib.probe_state_loop_bits() for key, lib in probes.items()}
    for (width, extra), b in bits.items():
        assert b == _explicit_bits(width, extra), (width, extra)


def _pointwise_inputs() -> torch.Tensor:
    """float32 values across the functions' whole range: a dense sweep of [-100, 100], the branch
    points (softplus' threshold 20, expm1's polynomial below 0.35, the sigmoid's clamp at 88), tiny
    and huge magnitudes, padded with zeros to a multiple of the channel block."""
    sweep = torch.linspace(-100, 100, 20001, dtype=torch.float64)
    edges = torch.tensor([0.0, 1e-30, 1e-8, 1e-4, 0.3499, 0.35, 0.3501, 19.999, 20.0, 20.001, 87.0, 88.0,
                          88.5, 89.0, 1e4, 1e30], dtype=torch.float64)
    x = torch.cat([sweep, edges, -edges]).float()
    return torch.cat([x, x.new_zeros(-x.numel() % 96)])  # EB = 96 (knobs.h)


@pytest.mark.parametrize("name", ["softplus", "sigmoid", "dsoftplus", "gate", "silu", "dsilu"])
def test_pointwise_functions_against_float64(probes, name):
    """softplus, sigmoid, softplus' derivative (-expm1(-x)), the gate x sigmoid(x) and the conv's SiLU
    and its derivative, in every build (the explicit x86 rows: sm_vexp_m, an approximate reciprocal and a Newton step;
    the generic ones: the inlined sm_expf family), to float32 accuracy, from -1e30 to 1e30."""
    x = _pointwise_inputs()
    if name == "dsoftplus":
        x = x.abs()  # its input is softplus' output: >= 0
    if name in ("silu", "dsilu"):
        x = x[:-5]  # a length with a partial last vector at either width
    xd = x.double()
    sig = torch.sigmoid(xd)
    ref = {"softplus": torch.nn.functional.softplus(xd), "sigmoid": sig, "dsoftplus": -torch.expm1(-xd),
           "gate": xd * sig, "silu": xd * sig, "dsilu": sig * (1 + xd * (1 - sig))}[name]
    for key, lib in probes.items():
        out = torch.empty_like(x)
        assert getattr(lib, f"probe_{name}")(x.data_ptr(), out.data_ptr(), x.numel()) == 0
        # relative 1e-6; absolute 1e-30 for results near float32's smallest normal (1.2e-38), which the
        # generic build's division (a reciprocal under -ffast-math) flushes to zero, and 1e-7 for silu',
        # whose 1 + p (1 - s) cancels near its zero at p = -1.28 in any float32 evaluation
        excess = (out.double() - ref).abs() - (1e-6 * ref.abs() + (1e-7 if name == "dsilu" else 1e-30))
        worst = int(excess.argmax())
        assert excess.max() <= 0, (name, key, x[worst].item(), out[worst].item(), ref[worst].item())


def test_production_library_exports_no_test_helpers(tmp_path):
    cc = _cc()
    path = tmp_path / "lib.so"
    cpu_library.build(cc, path)
    lib = ctypes.CDLL(str(path))
    assert hasattr(lib, "sl_fwd_f32") and not hasattr(lib, "sl_rows_f32")


def test_a_bad_channel_block_is_a_compile_error_on_every_build(tmp_path):
    """EB (knobs.h) must be a multiple of 16 for the generic body too, not only for the AVX-512 path."""
    cc = _cc()
    with pytest.raises(RuntimeError, match="EB must be"):
        cpu_library.build(cc, tmp_path / "lib.so", extra_flags=("-DEB=40",))


def _cross_flags() -> list[str]:
    # a cross compiler cannot detect the target CPU: the baseline ARMv8-A (NEON) instead of -march=native
    return [f if f != "-march=native" else "-march=armv8-a" for f in cpu_library.compile_flags(None) if f != "-mno-avx512f"]


def _aarch64_elf(path: Path) -> bool:
    head = path.read_bytes()[:20]
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


@pytest.mark.skipif(shutil.which(CROSS_CC) is None, reason=f"no {CROSS_CC} (Debian: gcc-aarch64-linux-gnu)")
def test_generic_body_builds_for_aarch64(tmp_path):
    """The kernels (the generic body: no x86 intrinsics outside their guards) and the peak-rate
    benchmark build for aarch64 with -Wall clean, and the state loops vectorise to NEON FMAs."""
    csrc = ROOT / "src" / "shufflemamba" / "ops" / "csrc"
    out = tmp_path / "kernels.so"
    cmd = [CROSS_CC, *_cross_flags(), "-Wall", "-Werror", f"-I{csrc}", "-o", str(out),
           *(str(csrc / n) for n in ("selective_scan.c", "mixer_cl.c")), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _aarch64_elf(out)
    peak = tmp_path / "peak.so"
    res = subprocess.run([CROSS_CC, *_cross_flags(), "-Wall", "-Werror", f"-I{csrc}", "-o", str(peak),
                          str(ROOT / "benchmarks" / "csrc" / "cpu_peak.c"), "-lm"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        dis = subprocess.run([objdump, "-d", str(out)], capture_output=True, text=True).stdout
        assert "fmla\tv" in dis  # vector FMAs: the omp simd loops vectorised for NEON


def test_isa_setting_builds_without_avx512(monkeypatch):
    """SHUFFLEMAMBA_CPU_ISA=avx2: the kernels' flags switch AVX-512 off (x86) and the auto width rule
    sees no AVX-512, so the AVX2-only code paths build and load as one variant; a bad value is a UserError."""
    monkeypatch.setenv(ops_config.ISA_ENV, "avx2")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert ("-mno-avx512f" in cpu_library.compile_flags(None)) == x86
    assert not ops_config.has_avx512()
    monkeypatch.setenv(ops_config.ISA_ENV, "native")
    assert "-mno-avx512f" not in cpu_library.compile_flags("512")
    monkeypatch.setenv(ops_config.ISA_ENV, "avx9")
    with pytest.raises(ops_config.KernelConfigError, match="SHUFFLEMAMBA_CPU_ISA must be native or avx2"):
        cpu_library.compile_flags(None)
