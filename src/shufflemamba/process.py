"""The ``shufflemamba`` command's process settings: how OpenMP's idle threads wait, and glibc's malloc.

Only the command applies them (its console script or ``python -m shufflemamba``); ``import
shufflemamba`` in a program of yours changes nothing. Stdlib only: the wait policy must be chosen
before torch loads its OpenMP runtime, which the package root does (see ``tune_openmp``).

OpenMP. An idle OpenMP thread either spins for a while before sleeping or sleeps at once
(``PASSIVE``). Neither suits every machine: on the 2-core Intel Xeon, one epoch of the demo's training
on an idle machine trained at 1.01-1.26x the images/s of ``PASSIVE`` with a bounded spin
(``GOMP_SPINCOUNT=30000``), and at 0.37x with two busy processes beside it, because each parallel op
then spins while the thread it waits for is descheduled (docs/benchmarks.md). So the command looks at
what else is running when it starts: if other processes use less than a quarter of a core it spins,
otherwise (and off Linux) it sleeps. Either environment variable set by you wins and nothing is measured.

malloc. A training step allocates and frees dozens of (batch, L, E) tensors; glibc serves blocks
above its mmap threshold with fresh mappings and returns freed memory at the top of its heaps, so each
step faults those pages in again (one demo epoch: 1.44 million minor faults, 118,000 with the settings
below, at 1.07-1.11x the images/s). The price: memory freed after a peak stays with the process.
Skipped where any ``MALLOC_*_`` variable is set, off Linux / glibc, or with ``SHUFFLEMAMBA_MALLOC=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import MutableMapping

SPIN_COUNT = "30000"  # ~tens of microseconds of spinning before a thread sleeps (libgomp's default: 300000)
IDLE_BELOW = 0.25  # other processes' CPU use, in cores, under which the machine counts as idle

# what set_wait_policy did: "user" (a variable was set), "spin" or "passive", and the load it measured
choice: tuple[str, float | None] = ("unset", None)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user / nice]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _own_jiffies() -> int | None:
    """This process's user + system clock ticks, from /proc/self/stat."""
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return int(rest[11]) + int(rest[12])  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


def other_cpu_load(window: float = 0.1) -> float | None:
    """Cores' worth of CPU time that other processes used over the next ``window`` seconds, or None
    where /proc is not readable (not Linux)."""
    a, own_a = _cpu_jiffies(), _own_jiffies()
    if a is None or own_a is None:
        return None
    time.sleep(window)
    b, own_b = _cpu_jiffies(), _own_jiffies()
    if b is None or own_b is None or b[1] <= a[1]:
        return None
    ncpu = os.cpu_count() or 1
    busy_other = max(0, (b[0] - a[0]) - (own_b - own_a))
    return busy_other / (b[1] - a[1]) * ncpu


def invoked_as_command(argv: list[str], orig_argv: list[str]) -> bool:
    """Whether this process is the ``shufflemamba`` command: its console script, or
    ``python -m shufflemamba`` (read from ``sys.orig_argv``: while the package is being imported for
    ``-m``, ``sys.argv[0]`` is just "-m", whichever module was asked for)."""
    if argv and os.path.basename(argv[0]) == "shufflemamba":
        return True
    for flag, module in zip(orig_argv, orig_argv[1:]):
        if flag == "-m":
            return module == "shufflemamba"
    return False


def set_wait_policy(environ: MutableMapping[str, str], measure=other_cpu_load) -> str:
    """Set ``GOMP_SPINCOUNT`` (idle machine) or ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` unless
    either is set already; returns "user", "spin" or "passive"."""
    global choice
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        choice = ("user", None)
        return "user"
    load = measure()
    if load is not None and load < IDLE_BELOW:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        choice = ("spin", load)
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        choice = ("passive", load)
    return choice[0]


def describe_wait_policy() -> str:
    """One line for the training log."""
    kind, load = choice
    if kind == "spin":
        return (f"OpenMP threads spin before sleeping (GOMP_SPINCOUNT={SPIN_COUNT}: other processes used "
                f"{load:.2f} cores)")
    if kind == "passive":
        why = "the machine is busy" if load is not None else "the load could not be measured"
        at = f": other processes used {load:.2f} cores" if load is not None else ""
        return f"OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE, {why}{at})"
    if kind == "user":
        return ("OpenMP wait policy as set: "
                + ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ))
    return "OpenMP wait policy left to the runtime (not the shufflemamba command, or torch was loaded first)"


def tune_openmp() -> str | None:
    """The command's wait policy (:func:`set_wait_policy`), when this process is the ``shufflemamba``
    command and torch has not loaded its OpenMP runtime yet; otherwise nothing is changed (None)."""
    if "torch" in sys.modules or not invoked_as_command(sys.argv, getattr(sys, "orig_argv", [])):
        return None
    return set_wait_policy(os.environ)


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
