"""How OpenMP's idle threads wait, chosen before torch loads its OpenMP runtime (stdlib only).

An idle OpenMP thread either spins for a while before sleeping or sleeps at once (``PASSIVE``).
Neither suits every machine. Measured on the 2-core Intel Xeon, one epoch of the demo's training
(``shufflemamba train --config demo``): on an idle machine a bounded spin (``GOMP_SPINCOUNT=30000``)
trained at 1.01-1.26x the images/s of ``PASSIVE`` in four alternating pairs (with ``PASSIVE`` every
parallel op woke a sleeping thread: 195,000 voluntary context switches in the epoch against 1,800);
with two busy processes beside it the
same spin ran at 0.37x, because each parallel op then spins while the thread it waits for is
descheduled (docs/benchmarks.md). So the ``shufflemamba`` command looks at what else is running
when it starts: if other processes use less than a quarter of a core it spins, otherwise (and
for ``import shufflemamba`` in a program of yours, and off Linux) it keeps ``PASSIVE``. Either
environment variable set by you wins and nothing is measured.
"""

from __future__ import annotations

import os
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


def set_wait_policy(environ: MutableMapping[str, str], cli: bool, measure=other_cpu_load) -> str:
    """Set ``GOMP_SPINCOUNT`` (idle machine, the command line) or ``OMP_WAIT_POLICY=PASSIVE`` in
    ``environ`` unless either is set already; returns "user", "spin" or "passive"."""
    global choice
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        choice = ("user", None)
        return "user"
    load = measure() if cli else None
    if load is not None and load < IDLE_BELOW:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        choice = ("spin", load)
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        choice = ("passive", load)
    return choice[0]


def describe() -> str:
    """One line for the training log."""
    kind, load = choice
    if kind == "spin":
        return (f"OpenMP threads spin before sleeping (GOMP_SPINCOUNT={SPIN_COUNT}: other processes used "
                f"{load:.2f} cores)")
    if kind == "passive":
        why = "the machine is busy" if load is not None else "not measured"
        at = f": other processes used {load:.2f} cores" if load is not None else ""
        return f"OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE, {why}{at})"
    if kind == "user":
        return ("OpenMP wait policy as set: "
                + ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ))
    return "OpenMP wait policy left to the runtime (torch was imported before shufflemamba)"
