"""Compiled CPU selective scan: a small C kernel built at first use and called through ctypes.

The kernels (csrc/selective_scan.c: (batch, E, L) scan; csrc/mixer_cl.c: channel-last conv1d + SiLU
and scan with a reverse flag, used by the Vim mixer) have no torch headers, so building it takes about a second
with the system C compiler. The shared library is cached per user, keyed by a hash of the
sources and headers, the compiler flags and the CPU (``-march=native`` binaries must not travel between
machines), and is built under a temporary name then renamed into place, so processes that
start together (pytest workers, torchrun ranks) never load a half-written file.

Vector width (x86 CPUs with AVX-512 only): gcc keeps 256-bit vectors there unless asked for 512-bit
ones, and which is faster depends on the CPU (some split 512-bit operations in two). With the
default ``auto`` the first process builds both variants, times a small forward + backward of the
channel-last scan on each (interleaved rounds, median), loads the faster and records the choice in
``vector_width_<key>.json`` next to the libraries, keyed by the CPU, compiler and sources, so later
processes read it instead of measuring (it is timed in thread CPU time, so waiting for a busy core
does not count, but a loaded machine still disturbs caches: delete the file to measure again, or
set the width). Other CPUs: one build.
``python -m shufflemamba.ops.cpu_scan`` prints the choice.

Environment variables:
    SHUFFLEMAMBA_CACHE: cache directory (default ``$XDG_CACHE_HOME/shufflemamba`` or
        ``~/.cache/shufflemamba``).
    SHUFFLEMAMBA_NO_COMPILE: set to 1 to skip the compiled path (the pure-PyTorch one is used).
    SHUFFLEMAMBA_CPU_VECTOR_WIDTH: ``256``, ``512`` or ``auto`` (default; see above). On x86 a
        number forces that width without measuring; elsewhere it is ignored.
    SHUFFLEMAMBA_CPU_ISA: ``native`` (default) or ``avx2``: on x86, build without AVX-512
        (``-mno-avx512f``), to run an AVX2-only CPU's code paths on an AVX-512 machine.
    CC: C compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_scan_inputs
from ..bench.report import cpu_model
from ..errors import UserError

__all__ = ["causal_conv1d_silu_cl", "cpu_scan_available", "load_library", "selective_scan_cl", "selective_scan_cpu",
           "vector_width_info"]

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (_CSRC / "selective_scan.c", _CSRC / "mixer_cl.c")
_HEADERS = tuple(sorted(_CSRC.glob("*.h")))  # included by the sources: hashed into the cache key too
_FLAGS = ("-O3", "-ffast-math", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99")
_ABI_VERSION = 15  # 3: sl_fwd / sl_bwd take an output scale (and sl_fwd accumulate); 4: ysave; 5: dbias_part;
# 6: cv_bwd's dx and sl_bwd's dz strided, written or accumulated; rms_fwd / rms_bwd; dt_proj fused in sl_*;
# 7: cv_bwd's and sl_bwd's parameter-gradient partial sums per thread (caller-zeroed), not per sample;
# 8: sl_bwd's dB, dC, ddt whole (batch, L, .) and added to (caller-zeroed), not per channel block;
# 9: sl_fwd / sl_bwd take ysave NULL with a gate (the backward then sums C_t h_t itself; older kernels
# would read through the NULL, so --kernels-from must refuse them)
# 10: sl_fwd's accumulate 2 (out's row added before the gate and scale: the mixer gates once)
# 11: cv_bwd / sl_bwd / rms_bwd reduce their per-thread partial sums themselves (one output buffer); sl_bwd
# writes dB, dC, ddt (zeroing them) with row strides (into x_proj's gradient); rms_fwd / rms_bwd fuse the
# residual add
# 12: sl_bwd takes x_proj's weight (NULL: as 11) and then runs x_proj's backward itself
# 13: and the conv's input, weight, bias and dx (NULL: as 12): the conv's backward after it
# 14: sl_fwd takes the conv's input, weight, bias, x_proj's weight and output (NULL: as 13): both run in it
# 15: sl_bwd's dB, dC, ddt contiguous again (their row strides, added in 11, had no caller left)
_NO_DTPROJ = (None, 0, 0, None, 0)  # sl_fwd / sl_bwd arguments when they read delta itself (dt_proj not fused)
_NO_CONV = (None, 0, 0, None, None, 0, None, 0, 0, 0)  # sl_bwd's arguments without the conv's backward
_NO_CONV_FWD = (None, 0, 0, None, None, 0, None, None)  # sl_fwd's without the conv and x_proj
XPROJ_FUSED_MAX = 256  # the widest x_proj output (R + 2N) sl_fwd runs x_proj for (SM_XPROJ_MAX in scan_steps.h)
_WIDTH_ENV = "SHUFFLEMAMBA_CPU_VECTOR_WIDTH"
_WIDTHS = ("256", "512")
_ROUNDS = 5  # interleaved timing rounds of the auto choice (median)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None  # why the compiled path is unavailable, once we know
_width_info: dict[str, Any] | None = None  # the vector width loaded and how it was chosen


def _cache_dir() -> Path:
    env = os.environ.get("SHUFFLEMAMBA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shufflemamba"


def _cpu_signature() -> str:
    """Model name and flags of the CPU: part of the cache key because of ``-march=native``."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        sig += "".join(sorted(set(lines)))
    except OSError:
        sig += platform.processor()
    return sig


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return not _isa_flags() and any(ln.startswith("flags") and "avx512f" in ln.split() for ln in f)
    except OSError:
        return False


class VectorWidthError(UserError, ValueError):
    """A bad SHUFFLEMAMBA_CPU_VECTOR_WIDTH: the CLI reports it as one line (UserError)."""


def _width_setting() -> str:
    """SHUFFLEMAMBA_CPU_VECTOR_WIDTH: "256", "512" or "auto" (unset or empty)."""
    value = os.environ.get(_WIDTH_ENV, "").strip().lower() or "auto"
    if value not in ("auto", *_WIDTHS):
        raise VectorWidthError(f"{_WIDTH_ENV} must be 256, 512 or auto, got {value!r}")
    return value


_ISA_ENV = "SHUFFLEMAMBA_CPU_ISA"


def _isa_flags() -> tuple[str, ...]:
    """SHUFFLEMAMBA_CPU_ISA: ``native`` (default: what -march=native gives) or ``avx2`` (x86: the
    AVX-512 features off, so an AVX-512 machine builds and runs the code paths of an AVX2-only CPU)."""
    isa = os.environ.get(_ISA_ENV, "").strip().lower() or "native"
    if isa not in ("native", "avx2"):
        raise VectorWidthError(f"{_ISA_ENV} must be native or avx2, got {isa!r}")
    return ("-mno-avx512f",) if isa == "avx2" and _is_x86() else ()


def _flags(width: str | None) -> tuple[str, ...]:
    # x86 only: gcc on ARM rejects the flag. SM_VECTOR_BITS tells the sources the width too: their
    # explicit-vector loops (scan_steps.h) use it, the omp simd loops follow the flag
    return _FLAGS + _isa_flags() + ((f"-mprefer-vector-width={width}", f"-DSM_VECTOR_BITS={width}") if width else ())


def _build(cc: str, out: Path, width: str | None = None, csrc: Path = _CSRC,
           sources: tuple[Path, ...] = _SOURCES, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile the kernel to ``out`` atomically (temp file in the same directory, then rename).
    ``csrc`` / ``sources``: another copy of the kernel sources (benchmarks build older revisions);
    ``extra_flags``: appended to the compiler's (benchmarks' A/B of a define or an optimisation flag)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *_flags(width), *extra_flags, f"-I{csrc}", "-o", tmp, *map(str, sources), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for sfx in ("f32", "f64"):
        fwd = getattr(lib, f"ss_fwd_{sfx}")
        fwd.argtypes = [p] * 9 + [i64] * 4 + [i32, i32]
        fwd.restype = i32
        bwd = getattr(lib, f"ss_bwd_{sfx}")
        bwd.argtypes = [p] * 16 + [i64] * 4 + [i32, i64, i32]
        bwd.restype = i32
        # channel-last kernels (mixer_cl.c)
        getattr(lib, f"cv_fwd_{sfx}").argtypes = [p, i64, i64, p, p, p] + [i64] * 4 + [i32, i32]
        getattr(lib, f"cv_bwd_{sfx}").argtypes = [p, i64, i64, p, p, p, p, i64, i64, i32, p] + [i64] * 4 + [i32, i32]
        strided = [p, i64, i64]
        head = [p, p, p, *strided, *strided, p, *strided, p]
        dtproj = [p, i64, i64, p, i64]  # dt (ptr, batch, time strides), dtw (R, E), R
        getattr(lib, f"sl_fwd_{sfx}").argtypes = (head + [p, p, p] + [i64] * 4 + [i32, i32, f64, i32, *dtproj]
                                                  + [p, i64, i64, p, p, i64, p, p, i32])
        getattr(lib, f"sl_bwd_{sfx}").argtypes = ([p, p, *head[1:-1]] + [p] * 3 + [p, i64, i64, i32] + [p] * 3
                                                  + [i64] * 4 + [i32, i32, f64, *dtproj, p, p]
                                                  + [p, i64, i64, p, p, i64, p, i64, i64, i32, i32])
        getattr(lib, f"rms_fwd_{sfx}").argtypes = [p] * 6 + [i64, i64, f64, i32]
        getattr(lib, f"rms_bwd_{sfx}").argtypes = [p] * 7 + [i64] * 3 + [i32]
        for name in ("cv_fwd", "cv_bwd", "sl_fwd", "sl_bwd", "rms_fwd", "rms_bwd"):
            getattr(lib, f"{name}_{sfx}").restype = i32
    lib.ss_abi_version.restype = i32
    if hasattr(lib, "sl_vector_path"):  # absent from builds before 2026-12-01 (profile_train_step --kernels-from)
        lib.sl_vector_path.restype = i32
    if hasattr(lib, "sl_rows_f32"):  # the row functions, for the tests (absent before 2026-12-01)
        lib.sl_rows_f32.argtypes = [p, p, i64, i32]
        lib.sl_rows_f32.restype = i32


def state_loop_bits(lib: ctypes.CDLL) -> int:
    """Vector width of a library's explicit AVX-512 state loops (csrc/scan_steps.h); 0: the generic ones."""
    return int(lib.sl_vector_path()) if hasattr(lib, "sl_vector_path") else 0


def _base_key(cc: str) -> str:
    """Hash of sources, headers, compiler, common flags and CPU (``-march=native`` binaries must not
    travel between machines): the libraries' names add the width to it, the choice file uses it."""
    key = hashlib.sha256()
    for src in (*_SOURCES, *_HEADERS):
        key.update(src.read_bytes())
    key.update(" ".join((cc, *_FLAGS)).encode())
    key.update(_cpu_signature().encode())
    return key.hexdigest()


def _load_variant(cc: str, base: str, width: str | None) -> ctypes.CDLL:
    """Build (if needed) and load the library of one vector width (None: no width flag)."""
    tag = hashlib.sha256(f"{base} {' '.join(_flags(width))}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"selective_scan_{tag}.so"
    if not path.exists():
        _build(cc, path, width)
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.ss_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"stale library {path}")
    return lib


def _choice_path(base: str) -> Path:
    return _cache_dir() / f"vector_width_{base[:16]}.json"


def _read_choice(path: Path) -> dict[str, Any] | None:
    """The recorded choice, or None when there is none (or it is unreadable: measure again)."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or str(rec.get("width")) not in _WIDTHS:
        return None
    return rec


def _write_choice(path: Path, rec: dict[str, Any]) -> None:
    """Write the choice atomically (temp file in the same directory, then rename): a process that
    starts meanwhile reads the old file, the new one or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# shape of the timing behind the auto choice: small (a fraction of a second in all) but with a
# Vim-like channel count and state size, so the state loops dominate as they do in training
_TIMING_SHAPE = dict(batch=4, L=64, E=192, N=16)


def _time_scan(libs: dict[str, ctypes.CDLL], rounds: int = _ROUNDS, reps: int = 6) -> dict[str, float]:
    """Median ms of one float32 forward + backward of the channel-last scan per library, one
    thread, the libraries interleaved in every round (alternating which goes first).

    Timed in CPU time of the calling thread (the kernels run on it alone): on a busy machine the
    wall clock also counts the time the thread waits for a core, which is noise here."""
    batch, L, E, N = (_TIMING_SHAPE[k] for k in ("batch", "L", "E", "N"))
    g = torch.Generator().manual_seed(0)  # its own generator: the global RNG stays untouched
    kw = dict(dtype=torch.float32, device="cpu")  # whatever default dtype / device the caller set

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, **kw)

    u, delta, z, gout = (randn(batch, L, E) for _ in range(4))
    At = -torch.rand(N, E, generator=g, **kw).add(0.1)
    B, C, D, bias = randn(batch, L, N), randn(batch, L, N), randn(E), randn(E)
    out, dsave, ysave, du, ddelta, dz = (torch.empty(batch, L, E, **kw) for _ in range(6))
    sums = torch.empty((N + 2) * E, **kw)  # dA, dD, dbias
    times: dict[str, list[float]] = {w: [] for w in libs}

    def step(lib: ctypes.CDLL) -> None:
        dB, dC = torch.empty(batch, L, N, **kw), torch.empty(batch, L, N, **kw)
        Bs, Cs, zs = (_ptr(B), L * N, N), (_ptr(C), L * N, N), (_ptr(z), L * E, E)  # (ptr, batch, time strides)
        lib.sl_fwd_f32(_ptr(u), _ptr(delta), _ptr(At), *Bs, *Cs, _ptr(D), *zs, _ptr(bias), _ptr(out), _ptr(dsave),
                       _ptr(ysave), batch, E, L, N, 1, 0, 1.0, 0, *_NO_DTPROJ, *_NO_CONV_FWD, 1)
        lib.sl_bwd_f32(_ptr(u), _ptr(dsave), _ptr(ysave), _ptr(At), *Bs, *Cs, _ptr(D), *zs, _ptr(gout), _ptr(du),
                       _ptr(ddelta), _ptr(dz), L * E, E, 0, _ptr(sums), _ptr(dB), _ptr(dC), batch, E, L, N,
                       1, 0, 1.0, *_NO_DTPROJ, None, None, *_NO_CONV, 1)

    for lib in libs.values():
        step(lib)  # warm-up: page faults, caches
    order = list(libs)
    for r in range(rounds):
        for w in order if r % 2 == 0 else order[::-1]:
            t0 = time.thread_time()
            for _ in range(reps):
                step(libs[w])
            times[w].append((time.thread_time() - t0) * 1e3 / reps)
    return {w: sorted(ts)[len(ts) // 2] for w, ts in times.items()}


def _choose_width(cc: str, base: str) -> tuple[ctypes.CDLL, dict[str, Any]]:
    """The auto rule on an AVX-512 CPU: the recorded choice, else measure both builds and record."""
    path = _choice_path(base)
    rec = _read_choice(path)
    if rec is not None:
        return _load_variant(cc, base, str(rec["width"])), {**rec, "source": "recorded", "file": str(path)}
    libs = {w: _load_variant(cc, base, w) for w in _WIDTHS}
    ms = _time_scan(libs)
    width = min(ms, key=ms.get)
    rec = {
        "width": int(width), "ms": {w: round(t, 4) for w, t in ms.items()},
        "ratio_512_over_256": round(ms["512"] / ms["256"], 4), "cpu": cpu_model(),
        "rounds": _ROUNDS, "shape": _TIMING_SHAPE, "clock": "thread CPU time", "loadavg": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_choice(path, rec)
    return libs[width], {**rec, "source": "measured", "file": str(path)}


def load_library() -> ctypes.CDLL | None:
    """Build (if needed) and load the compiled kernel; None, with one warning, if impossible.

    Raises:
        ValueError: SHUFFLEMAMBA_CPU_VECTOR_WIDTH is set to something other than 256, 512 or auto.
    """
    global _lib, _load_error, _width_info
    if _lib is not None or _load_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        setting = _width_setting()  # a bad value is the user's to fix, not a reason to fall back
        try:
            if os.environ.get("SHUFFLEMAMBA_NO_COMPILE", "0") not in ("", "0"):
                raise RuntimeError("disabled by SHUFFLEMAMBA_NO_COMPILE")
            cc = shutil.which(os.environ.get("CC", "cc"))
            if cc is None:
                raise RuntimeError("no C compiler found (set CC or install gcc)")
            base = _base_key(cc)
            if not _is_x86():
                lib, info = _load_variant(cc, base, None), {"width": None, "source": "not x86: one build"}
            elif setting != "auto":
                lib, info = _load_variant(cc, base, setting), {"width": int(setting), "source": f"{_WIDTH_ENV}"}
            elif not _has_avx512():
                lib, info = _load_variant(cc, base, None), {"width": None, "source": f"no AVX-512{' (' + _ISA_ENV + '=avx2)' if _isa_flags() else ''}: one build"}
            else:
                lib, info = _choose_width(cc, base)
            _lib, _width_info = lib, info
        except Exception as exc:  # any failure: fall back, but say why once
            _load_error = str(exc)
            if "SHUFFLEMAMBA_NO_COMPILE" not in _load_error:
                warnings.warn(
                    f"shufflemamba: compiled CPU selective scan unavailable ({_load_error}); "
                    "using the slower pure-PyTorch path",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _lib


def cpu_scan_available() -> bool:
    """True when the compiled kernel is built and loaded (builds it on the first call)."""
    return load_library() is not None


def vector_width_info() -> dict[str, Any] | None:
    """The loaded kernels' vector width and how it was chosen (builds / measures on first call).

    Returns:
        None without compiled kernels, else a dict with ``width`` (256, 512, or None for a build
        without a width flag), ``source`` ("measured", "recorded", the environment variable, or why
        there was one build) and, for an auto choice, ``ms`` (median forward + backward per width),
        ``ratio_512_over_256``, ``cpu`` and ``file`` (the choice file).
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
    line = f"cpu kernels: {width} vectors{loops} ({info['source']}"
    if "ms" in info:
        ms = info["ms"]
        line += (f"; fwd+bwd {ms['512']:.3f} ms at 512-bit, {ms['256']:.3f} ms at 256-bit, "
                 f"ratio {info['ratio_512_over_256']:.3f}; {info['file']}")
    return line + ")"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _sfx(t: Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def _lib_or_raise() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"compiled CPU kernels unavailable: {_load_error}")
    return lib


class _CompiledScan(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs; the backward recomputes the states row by row."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        lib = _lib_or_raise()
        batch, E, L = u.shape
        N = A.shape[1]
        u, delta, A, D, z, delta_bias = map(_contig, (u, delta, A, D, z, delta_bias))
        Bt = B.transpose(1, 2).contiguous()  # (batch, L, N): N innermost for the vector loops
        Ct = C.transpose(1, 2).contiguous()
        out = torch.empty_like(u)
        rc = getattr(lib, f"ss_fwd_{_sfx(u)}")(
            _ptr(u), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(z), _ptr(delta_bias),
            _ptr(out), batch, E, L, N, int(delta_softplus), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("selective scan kernel: out of memory")
        ctx.delta_softplus = delta_softplus
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, delta_bias)
        return out

    @staticmethod
    @once_differentiable  # the kernels' backward is not differentiable: a second derivative raises
    def backward(ctx, gout):
        u, delta, A, Bt, Ct, D, z, delta_bias = ctx.saved_tensors
        has_D, has_z, has_bias = ctx.has
        batch, E, L = u.shape
        N = A.shape[1]
        nthreads = torch.get_num_threads()
        # Work items are (E-chunk, batch) pairs: split E only when the batch alone cannot keep
        # every thread busy, since each extra chunk costs a (batch, L, N) partial dB/dC buffer.
        nchunk = 1 if batch >= 2 * nthreads else max(1, min(E, -(-2 * nthreads // max(batch, 1))))
        gout = gout.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if has_z else None
        dA_part = u.new_empty(batch, E, N)
        dB_part = u.new_empty(nchunk, batch, L, N)
        dC_part = u.new_empty(nchunk, batch, L, N)
        dD_part = u.new_empty(batch, E) if has_D else None
        rc = getattr(_lib_or_raise(), f"ss_bwd_{_sfx(u)}")(
            _ptr(u), _ptr(delta), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(z), _ptr(delta_bias),
            _ptr(gout), _ptr(du), _ptr(ddelta), _ptr(dA_part), _ptr(dB_part), _ptr(dC_part),
            _ptr(dD_part), _ptr(dz), batch, E, L, N, int(ctx.delta_softplus), nchunk, nthreads,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("selective scan kernel: out of memory")
        dB = dB_part.sum(0).transpose(1, 2)  # (batch, N, L)
        dC = dC_part.sum(0).transpose(1, 2)
        dA = dA_part.sum(0)
        dD = dD_part.sum(0) if has_D else None
        dbias = ddelta.sum((0, 2)) if has_bias else None  # delta_bias is broadcast over (batch, L)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Compiled CPU scan. Inputs must already share one float32 or float64 dtype (the dispatcher
    casts); shapes as in :func:`shufflemamba.ops.selective_scan`."""
    return _CompiledScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))


# ---------------------------------------------------------------------------------------------
# Channel-last kernels for the Vim mixer (csrc/mixer_cl.c). Sequence tensors are (batch, L, E)
# with unit stride along E: the layout the mixer's linears produce, so their strided slices go
# in as they are. ``reverse=True`` equals flip(op(flip(x))) along L, without materialising flips.
# ---------------------------------------------------------------------------------------------


def _rowmajor(t: Tensor) -> Tensor:
    """A (batch, L, C) view with unit stride along C: strided slices pass, anything else is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _threads(work: int) -> int:
    """OpenMP threads for a call over ``work`` elements: one for small calls, where a parallel
    region's start and barrier (milliseconds when a core is busy elsewhere) cost more than the work."""
    return 1 if work < (1 << 15) else torch.get_num_threads()


def _strides(t: Tensor | None) -> tuple[int, int]:
    """(batch, time) strides of a (batch, L, C) tensor, in elements; (0, 0) for None."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def conv_silu_fwd_cl(x: Tensor, wt: Tensor, bias: Tensor | None, reverse: bool) -> Tensor:
    """The ``cv_fwd`` kernel: ``silu(conv(x) + bias)``, (batch, L, E) contiguous, from x (batch, L, E)
    with unit stride along E and the weight as (K, E)."""
    batch, L, E = x.shape
    out = x.new_empty(batch, L, E)
    getattr(_lib_or_raise(), f"cv_fwd_{_sfx(x)}")(
        _ptr(x), *_strides(x), _ptr(wt), _ptr(bias), _ptr(out), batch, E, L, wt.shape[0], int(reverse),
        _threads(batch * L * E),
    )  # fmt: skip
    return out


def conv_silu_bwd_cl(x: Tensor, wt: Tensor, bias: Tensor | None, gout: Tensor, dx: Tensor, accumulate: bool,
                     reverse: bool) -> tuple[Tensor, Tensor]:
    """The ``cv_bwd`` kernel: writes dx (batch, L, E, unit stride along E), or adds to it with
    ``accumulate``; returns the weight gradient as (K, E) and the bias gradient (E,)."""
    batch, L, E = x.shape
    K = wt.shape[0]
    gout = gout.contiguous()  # held in a local: the kernel reads it after _ptr has returned
    sums = x.new_empty((K + 1) * E)  # [dw (K, E) | db (E)], reduced over the threads by the kernel
    rc = getattr(_lib_or_raise(), f"cv_bwd_{_sfx(x)}")(
        _ptr(x), *_strides(x), _ptr(wt), _ptr(bias), _ptr(gout), _ptr(dx), *_strides(dx),
        int(accumulate), _ptr(sums), batch, E, L, K, int(reverse), _threads(batch * L * E),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("conv1d kernel: out of memory")
    return sums[:K * E].view(K, E), sums[K * E:]


class FusedConv(NamedTuple):
    """The depthwise conv + SiLU whose output is the scan's u, for :func:`scan_fwd_cl` to run it (with
    x_proj) and :func:`scan_bwd_cl` its backward."""

    x: Tensor  # (batch, L, E) the conv's input, unit stride along E
    wt: Tensor  # (K, E) its weight, transposed
    bias: Tensor | None  # (E,)
    dx: Tensor | None = None  # (batch, L, E) unit stride along E: x's gradient, written or added to (backward)
    accumulate: bool = False  # add into dx instead of writing it


def scan_fwd_cl(u: Tensor, delta: Tensor | None, At: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, out: Tensor, dsave: Tensor | None, ysave: Tensor | None,
                *, softplus: bool, reverse: bool, out_scale: float, accumulate: bool,
                dt: Tensor | None = None, dtw: Tensor | None = None, gate_sum: bool = False,
                conv: FusedConv | None = None, x_proj_weight: Tensor | None = None,
                x_dbl: Tensor | None = None) -> None:
    """The ``sl_fwd`` kernel into ``out`` (added to it with ``accumulate``). u contiguous; B, C, z and
    dt (batch, L, .) with unit last stride; At (N, E). With ``dtw`` (R, E) the kernel forms
    delta = dt dtw itself and ``delta`` is not read; ``dsave`` / ``ysave`` (for the backward) may be None.
    With ``gate_sum`` out's values are added to y + D u before the gate and the scale (the mixer's
    second direction, after the first wrote its y + D u ungated): out = out_scale * gate(y + D u + out).
    With ``conv`` (x, wt, bias), ``x_proj_weight`` (R + 2N, E) and ``x_dbl`` (batch, L, R + 2N)
    contiguous, the kernel first computes, per sample, u = silu(conv(x)) into ``u`` (an output here) and
    x_dbl = u x_proj_weight^T, into which dt, B and C must be views."""
    if gate_sum and accumulate:
        raise ValueError("scan_fwd_cl: accumulate and gate_sum exclude each other")
    batch, L, E = u.shape
    N = At.shape[0]
    dtproj = (_ptr(dt), *_strides(dt), _ptr(dtw), dtw.shape[0]) if dtw is not None else _NO_DTPROJ
    fused = _NO_CONV_FWD
    if conv is not None:
        J = (0 if dtw is None else dtw.shape[0]) + 2 * N
        if (dtw is None or x_proj_weight is None or x_dbl is None or J > XPROJ_FUSED_MAX or x_proj_weight.shape != (J, E)
                or not x_proj_weight.is_contiguous() or x_dbl.shape != (batch, L, J) or not x_dbl.is_contiguous()
                or not u.is_contiguous() or conv.x.shape != u.shape or conv.x.stride(-1) != 1):
            raise ValueError(f"scan_fwd_cl: conv needs dt_proj fused, x_proj_weight (R + 2N, E) and x_dbl "
                             f"(batch, L, R + 2N) contiguous with R + 2N <= {XPROJ_FUSED_MAX}, x shaped as u")
        fused = (_ptr(conv.x), *_strides(conv.x), _ptr(conv.wt), _ptr(conv.bias), conv.wt.shape[0],
                 _ptr(x_proj_weight), _ptr(x_dbl))
    rc = getattr(_lib_or_raise(), f"sl_fwd_{_sfx(u)}")(
        _ptr(u), _ptr(delta), _ptr(At), _ptr(B), *_strides(B), _ptr(C), *_strides(C), _ptr(D), _ptr(z), *_strides(z),
        _ptr(delta_bias), _ptr(out), _ptr(dsave), _ptr(ysave), batch, E, L, N, int(softplus), int(reverse),
        float(out_scale), 2 if gate_sum else int(accumulate), *dtproj, *fused, _threads(batch * L * E * N),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")


class ScanGrads(NamedTuple):
    """What :func:`scan_bwd_cl` returns besides the tensors it writes (partial sums already reduced)."""

    dA: Tensor  # (E, N)
    dB: Tensor | None  # (batch, L, N); None when x_proj's backward ran in the kernel
    dC: Tensor | None  # (batch, L, N); as dB
    dD: Tensor  # (E,)
    dbias: Tensor  # (E,): the delta bias gradient, the sum of ddelta over batch and time
    ddt: Tensor | None  # (batch, L, R) with dt_proj fused, else None
    ddtw: Tensor | None  # (R, E) with dt_proj fused, else None
    dxw: Tensor | None = None  # (R + 2N, E): x_proj's weight gradient, when its backward ran in the kernel
    dconv_wt: Tensor | None = None  # (K, E): the conv's weight gradient, when its backward ran in the kernel
    dconv_bias: Tensor | None = None  # (E,): the conv's bias gradient, likewise


def scan_bwd_cl(u: Tensor, dsave: Tensor, ysave: Tensor | None, At: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, gout: Tensor, du: Tensor | None, ddelta: Tensor | None, dz: Tensor | None, *,
                dz_accumulate: bool, softplus: bool, reverse: bool, out_scale: float,
                dt: Tensor | None = None, dtw: Tensor | None = None, x_proj_weight: Tensor | None = None,
                conv: FusedConv | None = None) -> ScanGrads:
    """The ``sl_bwd`` kernel: writes du and (when given) ddelta, contiguous, and dz (unit last stride;
    added to with ``dz_accumulate``); ``gout`` is the gradient of the forward's ``out_scale * y``.
    With ``dtw`` the dt_proj gradients come back in :class:`ScanGrads` and ddelta may be None. With
    ``x_proj_weight`` (R + 2N, E) as well (u being x_proj's input, [dt | B | C] its output), x_proj's
    backward runs in the kernel: du includes its input gradient, ``dxw`` is its weight gradient, and
    ddt, dB, dC stay inside the kernel (None). With ``conv`` as well (u = silu(conv(conv.x))), the conv's
    backward follows in the kernel: du is then only the kernel's scratch (pass None), conv.dx gets x's
    gradient and ``dconv_wt`` / ``dconv_bias`` come back."""
    batch, L, E = u.shape
    N = At.shape[0]
    lib = _lib_or_raise()
    gout = gout.contiguous()  # held in a local: the kernel reads it after _ptr has returned
    R = 0 if dtw is None else dtw.shape[0]
    J = R + 2 * N
    if x_proj_weight is not None:
        if dtw is None or x_proj_weight.shape != (J, E) or not x_proj_weight.is_contiguous():
            raise ValueError(f"scan_bwd_cl: x_proj_weight must be contiguous (R + 2N, E) = {(J, E)} with dt_proj "
                             f"fused, got {tuple(x_proj_weight.shape)}")
    if conv is not None and (x_proj_weight is None or conv.x.shape != u.shape or conv.dx.shape != u.shape
                             or conv.wt.dim() != 2 or conv.wt.shape[1] != E or conv.x.stride(-1) != 1
                             or conv.dx.stride(-1) != 1):
        raise ValueError("scan_bwd_cl: conv needs x_proj_weight, x and dx shaped as u (unit stride along E) and "
                         "wt (K, E)")
    K = 0 if conv is None else conv.wt.shape[0]
    # [dA (N, E) | dD | dbias | ddtw (R, E) | dxw (J, E) | conv dw (K, E) | conv db (E)], reduced by the kernel
    sizes = [N * E, E, E, R * E, (J if x_proj_weight is not None else 0) * E, K * E, E if conv is not None else 0]
    sums = u.new_empty(sum(sizes))
    dtproj = _NO_DTPROJ if dtw is None else (_ptr(dt), *_strides(dt), _ptr(dtw), R)
    if x_proj_weight is None:
        dB, dC = u.new_empty(batch, L, N), u.new_empty(batch, L, N)  # zeroed and added to by the kernel
        ddt = u.new_empty(batch, L, R) if dtw is not None else None
    else:
        dB = dC = ddt = None
    rc = getattr(lib, f"sl_bwd_{_sfx(u)}")(
        _ptr(u), _ptr(dsave), _ptr(ysave), _ptr(At), _ptr(B), *_strides(B), _ptr(C), *_strides(C), _ptr(D),
        _ptr(z), *_strides(z), _ptr(gout), _ptr(du), _ptr(ddelta), _ptr(dz), *_strides(dz),
        int(dz_accumulate), _ptr(sums), _ptr(dB), _ptr(dC), batch, E, L, N, int(softplus), int(reverse),
        float(out_scale), *dtproj, _ptr(ddt), _ptr(x_proj_weight),
        *(_NO_CONV if conv is None else (_ptr(conv.x), *_strides(conv.x), _ptr(conv.wt), _ptr(conv.bias), K,
                                         _ptr(conv.dx), *_strides(conv.dx), int(conv.accumulate))),
        _threads(batch * L * E * N),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("selective scan kernel: out of memory")
    dA, dD, dbias, ddtw, dxw, dcw, dcb = sums.split(sizes)
    return ScanGrads(dA.view(N, E).t(), dB, dC, dD, dbias, ddt, ddtw.view(R, E) if dtw is not None else None,
                     dxw.view(J, E) if x_proj_weight is not None else None,
                     dcw.view(K, E) if conv is not None else None, dcb if conv is not None else None)


class _ConvSiluCL(torch.autograd.Function):
    """silu(depthwise causal conv1d(x) + bias) on (batch, L, E); saves x, recomputes the rest."""

    @staticmethod
    def forward(ctx, x, weight, bias, reverse: bool):
        x = _rowmajor(x)
        E, K = x.shape[-1], weight.shape[-1]
        wt = weight.reshape(E, K).t().contiguous()  # (K, E): channels innermost
        bias = _contig(bias)
        ctx.reverse, ctx.wshape, ctx.has_bias = reverse, weight.shape, bias is not None
        ctx.save_for_backward(x, wt, bias)
        return conv_silu_fwd_cl(x, wt, bias, reverse)

    @staticmethod
    @once_differentiable  # the kernels' backward is not differentiable: a second derivative raises
    def backward(ctx, gout):
        x, wt, bias = ctx.saved_tensors
        dx = x.new_empty(x.shape)
        dwt, db = conv_silu_bwd_cl(x, wt, bias, gout, dx, False, ctx.reverse)
        return dx, dwt.t().reshape(ctx.wshape), (db if ctx.has_bias else None), None


def causal_conv1d_silu_cl(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool = False) -> Tensor:
    """``silu(conv1d(x))`` of a depthwise causal conv (padding K-1, first L outputs), channel-last.

    Args:
        x: (batch, L, E), float32 or float64, unit stride along E (slices of a wider tensor are fine).
        weight: (E, 1, K) or (E, K), as ``nn.Conv1d(E, E, K, groups=E).weight``.
        bias: (E,) or None.
        reverse: anti-causal, equal to ``flip(f(flip(x)))`` along L.

    Returns:
        (batch, L, E) contiguous.
    """
    if x.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.numel() % x.shape[-1]:
        raise ValueError(f"causal_conv1d_silu_cl: x (batch, L, E) and weight (E, 1, K) expected, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise TypeError(f"causal_conv1d_silu_cl: float32/float64 of one dtype expected, got {x.dtype}, {weight.dtype}")
    return _ConvSiluCL.apply(x, weight, bias, bool(reverse))


class _ScanCL(torch.autograd.Function):
    """Channel-last selective scan; the backward recomputes states per (batch, channel block).

    Returns ``out_scale * y``, or with ``acc`` given, ``acc`` itself with ``out_scale * y`` added in
    place (marked dirty, so autograd knows; its gradient is passed through).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool,
                out_scale: float, acc):
        u, delta = u.contiguous(), delta.contiguous()
        B, C = _rowmajor(B), _rowmajor(C)
        z = None if z is None else _rowmajor(z)
        D, delta_bias = _contig(D), _contig(delta_bias)
        At = A.t().contiguous()  # (N, E)
        out = torch.empty_like(u) if acc is None else acc
        # the backward needs delta only as d = softplus(delta + bias): the forward writes d out
        # and that is saved instead, so the backward skips the softplus (and its log1p)
        dsave = torch.empty_like(u) if any(ctx.needs_input_grad) else None
        # with a gate, dz needs y + D u before it: saved too, so the backward's replay of the
        # states skips the C_t h_t sum (a load, an FMA and a store per step, channel and state)
        ysave = torch.empty_like(u) if dsave is not None and z is not None else None
        scan_fwd_cl(u, delta, At, B, C, D, z, delta_bias, out, dsave, ysave, softplus=delta_softplus,
                    reverse=reverse, out_scale=out_scale, accumulate=acc is not None)
        if acc is not None:
            ctx.mark_dirty(acc)
        ctx.out_scale, ctx.has_acc = float(out_scale), acc is not None
        ctx.flags = (delta_softplus, reverse, D is not None, z is not None, delta_bias is not None)
        ctx.save_for_backward(u, dsave, ysave, At, B, C, D, z)
        return out

    @staticmethod
    @once_differentiable  # the kernels' backward is not differentiable: a second derivative raises
    def backward(ctx, gout):
        u, dsave, ysave, At, B, C, D, z = ctx.saved_tensors
        softplus, reverse, has_D, has_z, has_bias = ctx.flags
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if has_z else None
        g = scan_bwd_cl(u, dsave, ysave, At, B, C, D, z, gout, du, ddelta, dz, dz_accumulate=False,
                        softplus=softplus, reverse=reverse, out_scale=ctx.out_scale)
        return (du, ddelta, g.dA, g.dB, g.dC, g.dD if has_D else None, dz, g.dbias if has_bias else None,
                None, None, None, (gout if ctx.has_acc else None))


def selective_scan_cl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    out_scale: float = 1.0,
    accumulate: Tensor | None = None,
) -> Tensor:
    """Selective scan on channel-last tensors: u, delta, z (batch, L, E); B, C (batch, L, N).

    Same semantics as :func:`shufflemamba.ops.selective_scan` on the transposed tensors;
    ``reverse=True`` scans from the last step to the first (``flip(scan(flip(.)))`` along L).
    Inputs must share one float32 / float64 dtype; B, C and z may be strided slices with unit
    stride along their last dim.

    Args:
        out_scale: the result is ``out_scale * y`` (scaled in the kernel, no extra pass).
        accumulate: a contiguous (batch, L, E) tensor of u's dtype that ``out_scale * y`` is added
            to in place and returned (the mixer's two directions sum into one buffer this way);
            autograd sees the in-place update. It must not be a leaf that requires grad.

    Returns:
        (batch, L, E) contiguous: a new tensor, or ``accumulate``.
    """
    check_scan_inputs("selective_scan_cl", u, delta, A, B, C, D, z, delta_bias, channel_last=True)
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.dtype != u.dtype:
            raise TypeError(f"selective_scan_cl: {name} is {t.dtype} but u is {u.dtype}")
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"selective_scan_cl: float32 or float64 inputs expected, got {u.dtype}")
    if accumulate is not None and (accumulate.shape != u.shape or accumulate.dtype != u.dtype
                                   or not accumulate.is_contiguous()):
        raise ValueError(f"selective_scan_cl: accumulate must be a contiguous {tuple(u.shape)} {u.dtype} tensor, "
                         f"got {tuple(accumulate.shape)} {accumulate.dtype}")
    return _ScanCL.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse),
                         float(out_scale), accumulate)


if __name__ == "__main__":  # python -m shufflemamba.ops.cpu_scan
    print(describe_vector_width())
