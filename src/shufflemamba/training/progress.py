"""How a training epoch shows its progress: a tqdm bar with ETA on a terminal, plain lines in logs and CI."""

from __future__ import annotations

import math
import time
from typing import Callable

LINES_PER_EPOCH = 4  # at least this many plain lines an epoch, so that short epochs show progress too


def duration(seconds: float) -> str:
    """``seconds`` as "42s", "3m05s" or "1h02m"."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochProgress:
    """A bar (``bar=True``: rank 0 on a terminal) or a log line every ``log_interval`` batches, and at
    least :data:`LINES_PER_EPOCH` an epoch, with the epoch's remaining time."""

    def __init__(self, epoch: int, n_batches: int, start: int, log_interval: int, log: Callable[[str], None],
                 bar: bool = False) -> None:
        self.epoch, self.n_batches, self.start, self.log = epoch, n_batches, start, log
        self.every = max(1, min(log_interval, math.ceil(n_batches / LINES_PER_EPOCH)))
        self.t0 = time.perf_counter()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

    def update(self, done: int, loss: float, lr: float, images_per_second: float) -> None:
        """After ``done`` micro-batches of the epoch (counting those before a resume)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{images_per_second:.0f}")
            self.bar.update(1)
        elif done % self.every == 0:
            left = (time.perf_counter() - self.t0) / max(done - self.start, 1) * (self.n_batches - done)
            self.log(f"epoch {self.epoch} [{done}/{self.n_batches}] loss {loss:.4f} lr {lr:.3e} "
                     f"{images_per_second:.0f} img/s eta {duration(left)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
