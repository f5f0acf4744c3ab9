"""Fault injection for the tests: NaN losses, empty batches, forced step checkpoints, signals and kills
after chosen updates, and a pause inside a checkpoint write.

The library knows nothing of it. :func:`install` patches a run from the outside, through what the
:class:`~shufflemamba.training.trainer.Trainer` builds: its loss and training loader are wrapped, its
checkpoint clock (``state.checkpoint_due``) is asked one more question, its optimiser gets a
post-step hook (torch's ``register_step_post_hook``), and ``os.replace`` of a checkpoint's temp file
can pause. In-process tests call ``install(Faults(...), monkeypatch.setattr)``; subprocess tests run
``tests/fault_runner.py`` where they would run ``python -m shufflemamba``, with the faults in the
environment variable ``SHUFFLEMAMBA_TEST_FAULTS``, a space- or ``;``-separated list::

    nan=3,4,5      the loss of these micro-batches is NaN (counted over the process: the n-th batch
                   the training loader yields, from 0)
    save=7         force a step checkpoint after these optimizer updates
    sigterm=9      send this process SIGTERM after update 9 (sigusr1=9: SIGUSR1)
    kill=9         SIGKILL this process after update 9 (no chance to save)
    pause_save=2   the 2nd checkpoint write stops after writing its temp file, creates
                   ``<output>/PAUSED`` and sleeps until killed
    empty=3        these micro-batches (counted like nan) arrive with no images, as when every image
                   of a batch was unreadable
    rank=1         sigterm / kill / empty apply to this rank only (default: every rank)

Updates are counted as the run counts them (``state.num_updates``: a resumed run goes on from its
checkpoint's count).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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
    def parse(cls, spec: str) -> "Faults":
        kw: dict[str, object] = {}
        for item in spec.replace(";", " ").split():
            key, _, value = item.partition("=")
            if key in ("nan", "save", "sigterm", "sigusr1", "kill", "empty"):
                kw[key] = _ints(value)
            elif key in ("pause_save", "rank"):
                kw[key] = int(value)
            else:
                raise ValueError(f"{ENV}: unknown fault '{item}'")
        return cls(**kw)  # type: ignore[arg-type]

    def on_rank(self, rank: int) -> bool:
        return self.rank is None or rank == self.rank


class _Batches:
    """The training loader, counting the micro-batches it yields; chosen ones arrive empty."""

    def __init__(self, loader: Any, faults: Faults, rank: int) -> None:
        self.loader, self.faults, self.rank = loader, faults, rank
        self.current = -1  # index of the batch being trained on, over the process

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self):
        for x, y, skipped in self.loader:
            self.current += 1
            if self.current in self.faults.empty and self.faults.on_rank(self.rank):
                x, y = x[:0], y[:0]
            yield x, y, skipped


def _install_in_trainer(trainer: Any, faults: Faults) -> None:
    state = trainer.state
    batches = _Batches(trainer.loaders["train_loader"], faults, trainer.rank)
    trainer.loaders["train_loader"] = batches
    if faults.nan:
        criterion = trainer.criterion

        def nan_loss(out: Any, y: Any) -> Any:
            loss = criterion(out, y)
            return loss * float("nan") if batches.current in faults.nan else loss

        trainer.criterion = nan_loss
    if faults.save:
        clock = state.checkpoint_due
        # asked during the micro-batches of update n + 1; the loop saves at that update's boundary
        state.checkpoint_due = lambda: clock() or state.num_updates + 1 in faults.save

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        update = state.num_updates + 1  # the loop counts this step once the optimiser has taken it
        if not faults.on_rank(trainer.rank):
            return
        if update in faults.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if update in faults.sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
        if update in faults.sigusr1:
            os.kill(os.getpid(), signal.SIGUSR1)

    if faults.kill or faults.sigterm or faults.sigusr1:
        trainer.optimizer.register_step_post_hook(after_step)


def install(faults: Faults, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make every Trainer built from now on (and checkpoint writes) misbehave as ``faults`` says;
    ``setattr_`` is ``monkeypatch.setattr`` in a test, so that the patches are undone after it."""
    from shufflemamba.training import trainer as trainer_mod

    init = trainer_mod.Trainer.__init__

    def faulty_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _install_in_trainer(self, faults)

    setattr_(trainer_mod.Trainer, "__init__", faulty_init)
    if faults.pause_save is not None:
        replace, writes = os.replace, []

        def pausing_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if str(src).endswith(".pt.tmp"):  # a checkpoint write, its temp file complete
                writes.append(src)
                if len(writes) == faults.pause_save:
                    with open(os.path.join(os.path.dirname(str(src)) or ".", "PAUSED"), "w") as f:
                        f.write(str(src))
                    while True:
                        time.sleep(1)
            replace(src, dst, *args, **kwargs)

        setattr_(os, "replace", pausing_replace)
