"""The CPU kernels' settings in one place: each reads one environment variable, documented here.

    SHUFFLEMAMBA_CACHE: where built kernels and the recorded vector-width choice live (default
        ``$XDG_CACHE_HOME/shufflemamba`` or ``~/.cache/shufflemamba``): per user, so a read-only
        install or a shared home still works.
    SHUFFLEMAMBA_NO_COMPILE: ``1`` skips the compiled kernels (the pure-PyTorch path runs), for
        machines where building or loading them is not wanted.
    SHUFFLEMAMBA_CPU_VECTOR_WIDTH: ``256``, ``512`` or ``auto`` (default). x86 with AVX-512 only:
        gcc keeps 256-bit vectors unless asked, and which width is faster depends on the CPU. auto
        loads the width recorded by ``python -m shufflemamba.ops.cpu_scan --measure`` when there is
        a record, else 512 (the widest the CPU has); a number forces that width. Ignored elsewhere.
    SHUFFLEMAMBA_CPU_GEMM: ``onednn``, ``blas`` or ``auto`` (default): what runs the Vim mixer's
        ``in_proj`` / ``out_proj`` in float32 on the CPU (``ops.cpu_linear``). torch's own linear calls
        its BLAS (MKL in the official wheels), which runs AMD's AVX-512 CPUs at about half of oneDNN's
        rate; auto uses the faster of the two as measured once on this CPU and recorded in the cache.
    CC: the C compiler that builds the kernels (default ``cc``).

A bad value raises :class:`KernelConfigError` (the CLI prints it as one ``error:`` line).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Literal

__all__ = ["PARALLEL_MIN_WORK", "TORCH_SCAN_CHUNK_ELEMENTS", "KernelConfigError", "VectorWidth", "cache_dir",
           "check_settings", "compile_disabled", "compiler", "cpu_model", "gemm", "cpu_signature", "has_avx2_fma", "has_avx512", "is_x86", "isa_flags", "vector_isa",
           "vector_width"]

CACHE_ENV = "SHUFFLEMAMBA_CACHE"
NO_COMPILE_ENV = "SHUFFLEMAMBA_NO_COMPILE"
VECTOR_WIDTH_ENV = "SHUFFLEMAMBA_CPU_VECTOR_WIDTH"
GEMM_ENV = "SHUFFLEMAMBA_CPU_GEMM"
ISA_ENV = "SHUFFLEMAMBA_CPU_ISA"  # avx2: build without AVX-512, to run an AVX2-only CPU's code on an AVX-512 one
CC_ENV = "CC"

# Tuning constants (no environment variable: they follow from the kernels, not from the user's machine)
PARALLEL_MIN_WORK = 1 << 15  # a kernel call over fewer elements runs on one thread: a parallel region's
# start and barrier (milliseconds when a core is busy elsewhere) cost more than such a call's work
TORCH_SCAN_CHUNK_ELEMENTS = 1 << 21  # the pure-PyTorch scan's (chunk, batch, E, N) work tensors: large
# enough to amortise Python's per-step overhead, small enough (tens of MB) to stay cache- and RAM-friendly

VectorWidth = Literal["auto", "256", "512"]
Gemm = Literal["auto", "onednn", "blas"]


class KernelConfigError(ValueError):
    """A kernel setting (environment variable) has a value the kernels cannot use: the user's to fix."""


def cache_dir() -> Path:
    """Directory of the built kernels and the recorded width choice (SHUFFLEMAMBA_CACHE)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shufflemamba"


def compile_disabled() -> bool:
    """SHUFFLEMAMBA_NO_COMPILE set to anything but empty or 0."""
    return os.environ.get(NO_COMPILE_ENV, "0") not in ("", "0")


def compiler() -> str:
    """The C compiler's name or path (CC, default ``cc``)."""
    return os.environ.get(CC_ENV, "cc")


def _setting(env: str, choices: tuple[str, ...], default: str) -> str:
    """The environment variable ``env``, lower-cased: one of ``choices``, or ``default`` when unset or empty.

    Raises:
        KernelConfigError: any other value.
    """
    value = os.environ.get(env, "").strip().lower() or default
    if value not in choices:
        raise KernelConfigError(f"{env} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    return value


def vector_width() -> VectorWidth:
    """SHUFFLEMAMBA_CPU_VECTOR_WIDTH: "256", "512" or "auto" (unset or empty).

    Raises:
        KernelConfigError: any other value.
    """
    return _setting(VECTOR_WIDTH_ENV, ("256", "512", "auto"), "auto")  # type: ignore[return-value]


def gemm() -> Gemm:
    """SHUFFLEMAMBA_CPU_GEMM: "onednn", "blas" or "auto" (unset or empty).

    Raises:
        KernelConfigError: any other value.
    """
    return _setting(GEMM_ENV, ("onednn", "blas", "auto"), "auto")  # type: ignore[return-value]


def check_settings() -> None:
    """Read every setting above once, so that a bad value stops a command before it starts work.

    Raises:
        KernelConfigError: the first bad value.
    """
    vector_width(), isa_setting(), gemm()


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.readlines()
    except OSError:
        return []


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo (None: absent)."""
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


# AMD's Zen generations as (family, models first..last): a cloud VM's /proc/cpuinfo often names only "AMD
# EPYC", for Zen 3 (AVX2), Zen 4 and Zen 5 (AVX-512) alike, whose figures differ
_AMD_ZEN = ((23, 0x00, 0x2F, "Zen"), (23, 0x30, 0xFF, "Zen 2"), (25, 0x00, 0x0F, "Zen 3"), (25, 0x10, 0x1F, "Zen 4"),
            (25, 0x20, 0x5F, "Zen 3"), (25, 0x60, 0xAF, "Zen 4"), (26, 0x00, 0xFF, "Zen 5"))


def amd_generation() -> str | None:
    """"Zen 3", "Zen 4", ... from /proc/cpuinfo's family and model on an AMD CPU; None elsewhere or unknown."""
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    if _cpuinfo_field("vendor_id") != "AuthenticAMD" or not (family or "").isdigit() or not (model or "").isdigit():
        return None
    return next((gen for fam, first, last, gen in _AMD_ZEN if fam == int(family) and first <= int(model) <= last), None)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; platform.processor() is often empty there), with AMD's
    Zen generation added when the name lacks it: "AMD EPYC (Zen 5)"."""
    name = _cpuinfo_field("model name")
    if name is None:
        return platform.processor() or platform.machine()
    gen = amd_generation()
    return f"{name} ({gen})" if gen and not re.search(r"\bzen\b", name, re.IGNORECASE) else name


def cpu_signature() -> str:
    """Architecture, model name and flags: part of the kernels' cache key, since ``-march=native``
    binaries must not travel between machines."""
    lines = sorted({ln for ln in _cpuinfo_lines() if ln.startswith(("model name", "flags", "Features"))})
    return platform.machine() + ("".join(lines) if lines else platform.processor())


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags() -> set[str]:
    return {f for ln in _cpuinfo_lines() if ln.startswith(("flags", "Features")) for f in ln.split(":", 1)[-1].split()}


def isa_setting() -> str:
    """SHUFFLEMAMBA_CPU_ISA: ``native`` (default: what -march=native gives) or ``avx2``."""
    return _setting(ISA_ENV, ("native", "avx2"), "native")


def isa_flags() -> tuple[str, ...]:
    """Compiler flags of the ISA setting: x86 with ``avx2`` switches the AVX-512 features off."""
    return ("-mno-avx512f",) if isa_setting() == "avx2" and is_x86() else ()


def has_avx512() -> bool:
    """Whether the kernels may use AVX-512: the CPU has it and SHUFFLEMAMBA_CPU_ISA does not cap it."""
    return "avx512f" in _cpu_flags() and not isa_flags()


def has_avx2_fma() -> bool:
    """Whether the CPU has AVX2 and FMA (every x86 CPU with AVX-512 has them too): the explicit 256-bit
    loops' build where there is no AVX-512."""
    return {"avx2", "fma"} <= _cpu_flags()


def vector_isa() -> str:
    """The widest vector instruction set the CPU has, for figures to name: "AVX-512", "AVX2",
    "NEON", else the architecture (speed figures differ between them on the same model of machine)."""
    flags = _cpu_flags()
    if "avx512f" in flags and not isa_flags():
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    if "asimd" in flags:
        return "NEON"
    return platform.machine()
