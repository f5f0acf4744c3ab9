"""Process set-up for training: torchrun / DDP initialisation and teardown, stop signals."""

from __future__ import annotations

import gc
import os
import signal
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SLURM's --signal sends USR1


def setup_distributed(cfg: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU).
    Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] is None and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda") if want_cuda else torch.device("cpu")


def teardown_distributed() -> None:
    """Destroy the process group, once every DDP wrapper is unreferenced.

    A DDP wrapper's Reducer holds the process group; if the Reducer dropped the group's last
    reference after destroy_process_group, the group's destructor would join gloo's worker threads
    on this thread with the GIL held while a worker waits for the GIL to free a finished
    all_gather's tensors: a deadlock we hit in about 1 of 4 two-process CPU runs
    (pytorch/pytorch#56297 describes the pattern). Callers drop their wrapper first; gc makes sure.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank (so all ranks take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def write_output_on_rank0(write: Callable[[], None], *, rank: int, device: torch.device, output: str) -> None:
    """Run ``write`` (which fills the output folder ``output``) on rank 0; every rank then learns whether it
    worked, so none is left waiting for the others. An OSError becomes one UserError naming the folder."""
    err: UserError | None = None
    if rank == 0:
        try:
            write()
        except UserError as e:
            err = e
        except OSError as e:
            err = UserError(f"cannot write to output folder '{output}': {e.strerror or type(e).__name__}")
    if not all_ranks_agree(err is None, device):
        raise err or UserError(f"rank 0 could not prepare output folder '{output}'")


def rank0_value(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a generated run folder name, which the clock makes differ)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SignalCatcher:
    """SIGTERM / SIGINT / SIGUSR1 set ``state.stop_signal`` (the loop saves a step checkpoint and
    stops at the next accumulation boundary); a second signal gets the previous behaviour."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalCatcher":
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.state.stop_signal = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
