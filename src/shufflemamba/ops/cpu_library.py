"""Build, cache and load the compiled CPU kernels (csrc/*.c), called through ctypes.

The kernels have no torch headers, so building them takes about a second with the system C
compiler. The shared library is cached per user (:func:`~shufflemamba.ops.config.cache_dir`), named
by a hash of the sources and headers, the compiler, its flags and the CPU (``-march=native``
binaries must not travel between machines), and is built under a temporary name then renamed into
place, so processes that start together (pytest workers, torchrun ranks) never load a half-written
file. One variant is built: the vector width comes from :func:`~shufflemamba.ops.config.vector_width`
and, for ``auto`` on AVX-512 CPUs, from a recorded measurement when there is one (see
:func:`choice_path`), else 512 bits. ``python -m shufflemamba.ops.cpu_scan`` prints what loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from . import config

__all__ = ["ABI_VERSION", "build", "choice_path", "compile_flags", "cpu_scan_available", "declare",
           "describe_vector_width", "library", "load_library", "read_choice", "state_loop_bits", "swap_library",
           "vector_width_info", "write_choice"]

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "selective_scan.c", CSRC / "mixer_cl.c")
HEADERS = tuple(sorted(CSRC.glob("*.h")))  # included by the sources: hashed into the cache key too
_FLAGS = ("-O3", "-ffast-math", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99")
ABI_VERSION = 16  # the sources' ss_abi_version(): a library whose arguments differ from _declare's is refused

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None  # why the compiled path is unavailable, once we know
_width_info: dict[str, Any] | None = None  # the vector width loaded and how it was chosen


def compile_flags(width: str | None) -> tuple[str, ...]:
    """The compiler flags of a build of ``width`` bits (None: the compiler's default vectors).
    The width flag is x86-only (gcc on ARM rejects it); SM_VECTOR_BITS tells the sources' explicit
    vector loops the width, the omp simd loops follow the flag."""
    return _FLAGS + config.isa_flags() + ((f"-mprefer-vector-width={width}", f"-DSM_VECTOR_BITS={width}") if width else ())


def build(cc: str, out: Path, width: str | None = None, csrc: Path = CSRC, sources: tuple[Path, ...] = SOURCES,
          extra_flags: tuple[str, ...] = ()) -> None:
    """Compile the kernels to ``out`` atomically (temp file in the same directory, then rename).
    ``csrc`` / ``sources``: another copy of the sources (benchmarks build other revisions);
    ``extra_flags``: appended to the compiler's (benchmarks' A/B of a define or a flag)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *compile_flags(width), *extra_flags, f"-I{csrc}", "-o", tmp, *map(str, sources), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def declare(lib: ctypes.CDLL, missing_ok: bool = False) -> None:
    """The kernels' C signatures (csrc/*.c), so ctypes converts every argument; ``missing_ok`` skips the
    kernels an older revision's build lacks (a benchmark's A/B against it)."""
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    strided = [p, i64, i64]  # pointer, batch stride, time stride
    head = [p, p, p, *strided, *strided, p, *strided, p]  # u, delta, A, B, C, D, z, delta_bias
    dtproj = [p, i64, i64, p, i64]  # dt (pointer, batch and time strides), dt_proj's weight (E, R), R
    signatures = {
        "ss_fwd": [p] * 9 + [i64] * 4 + [i32, i32],
        "ss_bwd": [p] * 16 + [i64] * 4 + [i32, i64, i32],
        "cv_fwd": [p, i64, i64, p, p, p] + [i64] * 4 + [i32, i32],
        "cv_bwd": [p, i64, i64, p, p, p, p, i64, i64, i32, p, p] + [i64] * 4 + [i32, i32],
        "cx_fwd": [p, i64, i64, p, p, p, p, p] + [i64] * 5 + [i32, i32],
        "sl_fwd": head + [p, p, p] + [i64] * 4 + [i32, i32, f64, i32, *dtproj] + [p, i64, i64, p, p, i64, p, p, i32],
        # the seven parameter gradients (dA, dD, dbias, ddtw, dxw, conv dw, conv db), then dB, dC
        "sl_bwd": ([p, p, *head[1:-1]] + [p] * 3 + [p, i64, i64, i32] + [p] * 9 + [i64] * 4 + [i32, i32, f64, *dtproj]
                   + [p, p] + [p, i64, i64, p, p, i64, p, i64, i64, i32, i32]),
        "rms_fwd": [p] * 6 + [i64, i64, f64, i32],
        "rms_bwd": [p] * 7 + [i64] * 3 + [i32],
    }
    for name, argtypes in signatures.items():
        for sfx in ("f32", "f64"):
            if missing_ok and not hasattr(lib, f"{name}_{sfx}"):
                continue
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes, fn.restype = argtypes, i32
    lib.ss_abi_version.restype = i32
    lib.sl_vector_path.restype = i32


def state_loop_bits(lib: ctypes.CDLL) -> int:
    """Vector width of a library's explicit x86 state loops (csrc/scan_steps.h); 0: the generic ones."""
    return int(lib.sl_vector_path())


def _base_key(cc: str) -> str:
    """Hash of sources, headers, compiler, common flags and CPU: the libraries' names add the width
    to it, the recorded choice uses it."""
    key = hashlib.sha256()
    for src in (*SOURCES, *HEADERS):
        key.update(src.read_bytes())
    key.update(" ".join((cc, *_FLAGS)).encode())
    key.update(config.cpu_signature().encode())
    return key.hexdigest()


def load_variant(cc: str, width: str | None, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (if needed) and load the library of one vector width (None: no width flag), with
    ``extra_flags`` added to the compiler's (``-mno-avx512f`` builds the AVX2 code on an AVX-512 CPU)."""
    flags = " ".join((*compile_flags(width), *extra_flags))
    tag = hashlib.sha256(f"{_base_key(cc)} {flags}".encode()).hexdigest()[:16]
    path = config.cache_dir() / f"selective_scan_{tag}.so"
    if not path.exists():
        build(cc, path, width, extra_flags=extra_flags)
    lib = ctypes.CDLL(str(path))
    declare(lib)
    if lib.ss_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.ss_abi_version()}, expected {ABI_VERSION}")
    return lib


def choice_path(cc: str) -> Path:
    """Where a measured vector width is recorded (``python -m shufflemamba.ops.cpu_scan --measure``),
    keyed by the CPU, compiler and sources: delete it to go back to the default, or set the width."""
    return config.cache_dir() / f"vector_width_{_base_key(cc)[:16]}.json"


def _is_width_record(rec: dict[str, Any]) -> bool:
    return str(rec.get("width")) in ("256", "512")


def read_choice(path: Path, valid: Callable[[dict[str, Any]], bool] = _is_width_record) -> dict[str, Any] | None:
    """The recorded choice (a vector width's unless ``valid`` says what a record must hold), or None when
    there is none or it is unreadable."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and valid(rec) else None


def write_choice(path: Path, rec: dict[str, Any]) -> None:
    """Write the choice atomically: a process starting meanwhile reads the old file, the new one or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _choose_width(cc: str) -> tuple[str | None, dict[str, Any]]:
    """The one width to build, and why."""
    setting = config.vector_width()
    if not config.is_x86():
        return None, {"width": None, "source": "not x86: compiler default"}
    if setting != "auto":
        return setting, {"width": int(setting), "source": config.VECTOR_WIDTH_ENV}
    if not config.has_avx512():
        capped = f" ({config.ISA_ENV}=avx2)" if config.isa_flags() else ""
        if config.has_avx2_fma():  # the explicit loops' AVX2 build (csrc/vec_x86.h)
            return "256", {"width": 256, "source": f"no AVX-512{capped}: AVX2 + FMA"}
        return None, {"width": None, "source": f"no AVX-512{capped}: compiler default"}
    path = choice_path(cc)
    rec = read_choice(path)
    if rec is not None:
        return str(rec["width"]), {**rec, "source": "recorded", "file": str(path)}
    return "512", {"width": 512, "source": "default on AVX-512"}


def load_library() -> ctypes.CDLL | None:
    """Build (if needed) and load the compiled kernels; None, with one warning, if impossible.

    Raises:
        KernelConfigError: SHUFFLEMAMBA_CPU_VECTOR_WIDTH is not 256, 512 or auto.
    """
    global _lib, _load_error, _width_info
    if _lib is not None or _load_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        config.vector_width()  # a bad value is the user's to fix, not a reason to fall back
        config.isa_setting()
        try:
            if config.compile_disabled():
                raise RuntimeError(f"disabled by {config.NO_COMPILE_ENV}")
            cc = shutil.which(config.compiler())
            if cc is None:
                raise RuntimeError("no C compiler found (set CC or install gcc)")
            width, info = _choose_width(cc)
            _lib, _width_info = load_variant(cc, width), info
        except Exception as exc:  # any failure: fall back, but say why once
            _load_error = str(exc)
            if config.NO_COMPILE_ENV not in _load_error:
                warnings.warn(f"shufflemamba: compiled CPU kernels unavailable ({_load_error}); "
                              "using the slower pure-PyTorch path", RuntimeWarning, stacklevel=2)
    return _lib


def library() -> ctypes.CDLL:
    """The loaded kernels; RuntimeError when they are unavailable."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"compiled CPU kernels unavailable: {_load_error}")
    return lib


def swap_library(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    """Run the kernels of ``lib`` from now on (a benchmark's A/B of two builds); returns the previous."""
    global _lib
    previous, _lib = _lib, lib
    return previous


@torch.compiler.assume_constant_result  # traced code (torch.compile) takes the answer as a constant
def cpu_scan_available() -> bool:
    """True when the compiled kernels are built and loaded (builds them on the first call)."""
    return load_library() is not None


def vector_width_info() -> dict[str, Any] | None:
    """The loaded kernels' vector width and how it was chosen; None without compiled kernels.

    Keys: ``width`` (256, 512, or None for the compiler's default), ``source`` (the environment
    variable, "recorded", the default, or why there is no width flag) and, for a recorded choice,
    the measurement and ``file``.
    """
    return dict(_width_info) if load_library() is not None and _width_info is not None else None


def describe_vector_width() -> str:
    """One line for reports: the width the CPU kernels run with, and why."""
    info = vector_width_info()
    if info is None:
        return f"cpu kernels: unavailable ({_load_error})"
    width = f"{info['width']}-bit" if info["width"] else "compiler default"
    bits = state_loop_bits(_lib) if _lib is not None else 0
    loops = f", explicit {bits}-bit state loops" if bits else ""
    line = f"cpu kernels: {width} vectors{loops} on {config.vector_isa()} ({info['source']}"
    if "ms" in info:
        ms = info["ms"]
        line += f"; fwd+bwd {ms['512']:.3f} ms at 512-bit, {ms['256']:.3f} ms at 256-bit; {info['file']}"
    return line + ")"
