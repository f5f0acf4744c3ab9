"""Compiled CPU selective scan: a small C kernel built at first use and called through ctypes.

The kernel (csrc/selective_scan.c) has no torch headers, so building it takes about a second
with the system C compiler. The shared library is cached per user, keyed by a hash of the
source, the compiler flags and the CPU (``-march=native`` binaries must not travel between
machines), and is built under a temporary name then renamed into place, so processes that
start together (pytest workers, torchrun ranks) never load a half-written file.

Environment variables:
    SHUFFLEMAMBA_CACHE: cache directory (default ``$XDG_CACHE_HOME/shufflemamba`` or
        ``~/.cache/shufflemamba``).
    SHUFFLEMAMBA_NO_COMPILE: set to 1 to skip the compiled path (the pure-PyTorch one is used).
    CC: C compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["cpu_scan_available", "load_library", "selective_scan_cpu"]

_SOURCE = Path(__file__).parent / "csrc" / "selective_scan.c"
_FLAGS = ("-O3", "-ffast-math", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99")
_ABI_VERSION = 1

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None  # why the compiled path is unavailable, once we know


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


def _build(cc: str, out: Path) -> None:
    """Compile the kernel to ``out`` atomically (temp file in the same directory, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for sfx in ("f32", "f64"):
        fwd = getattr(lib, f"ss_fwd_{sfx}")
        fwd.argtypes = [p] * 9 + [i64] * 4 + [i32, i32]
        fwd.restype = i32
        bwd = getattr(lib, f"ss_bwd_{sfx}")
        bwd.argtypes = [p] * 16 + [i64] * 4 + [i32, i64, i32]
        bwd.restype = i32
    lib.ss_abi_version.restype = i32


def load_library() -> ctypes.CDLL | None:
    """Build (if needed) and load the compiled kernel; None, with one warning, if impossible."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        try:
            if os.environ.get("SHUFFLEMAMBA_NO_COMPILE", "0") not in ("", "0"):
                raise RuntimeError("disabled by SHUFFLEMAMBA_NO_COMPILE")
            cc = shutil.which(os.environ.get("CC", "cc"))
            if cc is None:
                raise RuntimeError("no C compiler found (set CC or install gcc)")
            key = hashlib.sha256()
            key.update(_SOURCE.read_bytes())
            key.update(" ".join((cc, *_FLAGS)).encode())
            key.update(_cpu_signature().encode())
            path = _cache_dir() / f"selective_scan_{key.hexdigest()[:16]}.so"
            if not path.exists():
                _build(cc, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.ss_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"stale library {path}")
            _lib = lib
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


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


class _CompiledScan(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs; the backward recomputes the states row by row."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        lib = load_library()
        if lib is None:
            raise RuntimeError(f"compiled CPU selective scan unavailable: {_load_error}")
        batch, E, L = u.shape
        N = A.shape[1]
        u, delta, A, D, z, delta_bias = map(_contig, (u, delta, A, D, z, delta_bias))
        Bt = B.transpose(1, 2).contiguous()  # (batch, L, N): N innermost for the vector loops
        Ct = C.transpose(1, 2).contiguous()
        out = torch.empty_like(u)
        sfx = "f64" if u.dtype == torch.float64 else "f32"
        rc = getattr(lib, f"ss_fwd_{sfx}")(
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
        sfx = "f64" if u.dtype == torch.float64 else "f32"
        rc = getattr(load_library(), f"ss_bwd_{sfx}")(
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
