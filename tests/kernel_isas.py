"""The compiled kernels built for each vector ISA this CPU runs, for tests parametrized over them.

On an AVX-512 CPU: the 512-bit build (the default there), the 256-bit build
(SHUFFLEMAMBA_CPU_VECTOR_WIDTH=256) and the AVX2 build (``-mno-avx512f``, 256 bits: the explicit loops an
AVX2-only x86 such as AMD Zen 3 runs); on any x86 the AVX2 build and the generic body (no width flag: the
``omp simd`` loops that CPUs without an explicit path, aarch64 among them, run). Other architectures have
the loaded build only. Builds are cached like the package's own (SHUFFLEMAMBA_CACHE).
"""

from __future__ import annotations

import shutil

import pytest

from shufflemamba.ops import config, cpu_library

ISAS = {"avx512": ("512", ()), "avx512-256bit": ("256", ()), "avx2": ("256", ("-mno-avx512f",)),
        "generic": (None, ("-mno-avx512f",))}


def isa_library(name: str):
    """The kernels built for ``name`` (a key of ISAS), or a pytest skip when this CPU cannot run them."""
    if not config.is_x86():
        pytest.skip("x86 vector ISAs")
    if name.startswith("avx512") and not config.has_avx512():
        pytest.skip("no AVX-512 on this CPU")
    if name == "avx2" and not config.has_avx2_fma():
        pytest.skip("no AVX2 + FMA on this CPU")
    cc = shutil.which(config.compiler())
    if cc is None:
        pytest.skip("no C compiler")
    width, flags = ISAS[name]
    return cpu_library.load_variant(cc, width, flags)


@pytest.fixture(params=list(ISAS))
def isa(request, monkeypatch):
    """Runs the test with the kernels of each ISA loaded in turn (the package's own restored after)."""
    if not cpu_library.cpu_scan_available():
        pytest.skip("compiled CPU kernels unavailable")
    monkeypatch.setattr(cpu_library, "_lib", isa_library(request.param))
    return request.param
