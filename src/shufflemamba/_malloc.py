"""glibc malloc settings for the ``shufflemamba`` command: large blocks from the heap, and kept.

A training step allocates and frees dozens of (batch, L, E) tensors. glibc serves blocks above its
mmap threshold with fresh mappings and gives freed memory at the top of its heaps back to the
system, so the next step's first writes into such tensors fault the pages in again (zeroed by the
kernel): one epoch of the demo's training took 1.44 million minor page faults, ~3,000 a step, half
of them inside the scan's backward kernel. With the settings below the epoch took 118,000 and
trained at 1.07-1.11x the images/s (Intel Xeon, alternating runs with ``SHUFFLEMAMBA_MALLOC=0``;
docs/benchmarks.md). The price: memory freed after a peak stays with the
process. Applied by the command line only (not by ``import shufflemamba``); skipped where any
``MALLOC_*_`` variable is set, off Linux / glibc, or with ``SHUFFLEMAMBA_MALLOC=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,  # blocks up to 32 MB (glibc's maximum) from the heap, not fresh mappings
    M_TRIM_THRESHOLD: 1 << 30,  # give the heap's top back only past 1 GB free
    M_TOP_PAD: 64 << 20,  # grow the heap 64 MB at a time
}


def tune_malloc() -> bool:
    """Apply :data:`SETTINGS` with glibc's ``mallopt``; True when all took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("SHUFFLEMAMBA_MALLOC", "1") == "0":
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False  # the user tunes glibc themselves
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
