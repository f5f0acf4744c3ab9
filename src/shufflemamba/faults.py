"""Fault injection for the tests: NaN losses, forced step checkpoints, kills and signals at chosen steps.

Read once from the environment variable ``SHUFFLEMAMBA_TEST_FAULTS`` (unset in normal runs, where
every check below is a set lookup on an empty set). The value is a space- or ``;``-separated list::

    nan=3,4,5      the loss of these micro-batches is NaN (counted over the run: epoch * batches + i)
    save=7         force a step checkpoint after these optimizer updates
    sigterm=9      send this process SIGTERM after update 9 (sigusr1=9: SIGUSR1)
    kill=9         SIGKILL this process after update 9 (no chance to save)
    pause_save=2   the 2nd checkpoint write stops after writing its temp file, creates
                   ``<output>/PAUSED`` and sleeps until killed
    empty=3        these micro-batches (counted like nan) arrive with no images, as when every image
                   of a batch was unreadable
    rank=1         sigterm / kill / empty apply to this rank only (default: every rank)
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

ENV = "SHUFFLEMAMBA_TEST_FAULTS"


def _ints(value: str) -> frozenset[int]:
    return frozenset(int(v) for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Faults:
    nan: frozenset[int] = field(default_factory=frozenset)
    save: frozenset[int] = field(default_factory=frozenset)
    sigterm: frozenset[int] = field(default_factory=frozenset)
    sigusr1: frozenset[int] = field(default_factory=frozenset)
    kill: frozenset[int] = field(default_factory=frozenset)
    empty: frozenset[int] = field(default_factory=frozenset)
    pause_save: int | None = None
    rank: int | None = None

    @classmethod
    def from_env(cls) -> "Faults":
        spec = os.environ.get(ENV, "").replace(";", " ").split()
        kw: dict[str, object] = {}
        for item in spec:
            key, _, value = item.partition("=")
            if key in ("nan", "save", "sigterm", "sigusr1", "kill", "empty"):
                kw[key] = _ints(value)
            elif key in ("pause_save", "rank"):
                kw[key] = int(value)
            else:
                raise ValueError(f"{ENV}: unknown fault '{item}'")
        return cls(**kw)  # type: ignore[arg-type]

    def empty_batch(self, step: int, rank: int) -> bool:
        """Whether micro-batch ``step`` (epoch * batches + i) of this rank is to arrive empty."""
        return step in self.empty and (self.rank is None or rank == self.rank)

    def after_update(self, num_updates: int, rank: int) -> None:
        """Signal or kill this process if the test asked for it at this update."""
        if self.rank is not None and rank != self.rank:
            return
        if num_updates in self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if num_updates in self.sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
        if num_updates in self.sigusr1:
            os.kill(os.getpid(), signal.SIGUSR1)

    def maybe_pause_in_save(self, save_number: int, tmp_path: str) -> None:
        """Block forever inside the ``pause_save``-th checkpoint write (the test kills us here)."""
        if self.pause_save != save_number:
            return
        with open(os.path.join(os.path.dirname(tmp_path) or ".", "PAUSED"), "w") as f:
            f.write(tmp_path)
        while True:
            time.sleep(1)


FAULTS = Faults.from_env()
