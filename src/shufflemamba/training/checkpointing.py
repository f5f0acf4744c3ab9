"""Training checkpoints: what they hold (defined once, in :func:`training_checkpoint`), how they are
written (atomically, never more than ``keep_last`` step files) and how they are read (safely).

Two kinds share one layout:

- epoch checkpoints, ``last.pt`` / ``best.pt``, written when an epoch has been evaluated;
- step checkpoints, ``step_<updates>.pt``, written mid-epoch every ``--checkpoint-every`` minutes and
  when a stop signal arrives. ``batches_done`` says how many micro-batches of ``epoch`` they hold;
  a resume trains the epoch's remaining batches, in the same order, from the same RNG states.

Everything in a checkpoint is a tensor or a plain Python value (RNG states included), so our own
files load with ``torch.load(weights_only=True)``: loading never runs code from the file. A file
that needs the full unpickler is refused unless the user says they trust it.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import random
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError

VERSION = 2
TRUST_ENV = "SHUFFLEMAMBA_TRUST_CHECKPOINTS"
TRUST_HINT = f"if you trust the file, pass --trust-checkpoint (or set {TRUST_ENV}=1) to load it with pickle"
STEP_PATTERN = re.compile(r"step_(\d+)\.pt$")


# --------------------------------------------------------------------------- what a run has done


@dataclass
class EpochSums:
    """Training-loss sums of the epoch in progress, on this rank (summed over ranks at its end)."""

    loss_sum: float = 0.0
    loss_count: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class Progress:
    """Where a run stands, besides its weights and optimiser: everything a resume needs."""

    epoch: int = 0  # the epoch in progress, or the one to start when batches_done == 0
    batches_done: int = 0  # micro-batches of ``epoch`` already trained
    num_updates: int = 0  # optimiser steps over the whole run (the lr schedule's clock)
    nonfinite_streak: int = 0
    nonfinite_steps: int = 0  # micro-batches skipped for a non-finite loss
    skipped_images: int = 0  # unreadable images so far
    best_top1: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics rows of finished epochs


# --------------------------------------------------------------------------- RNG states as plain data


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    key, mt, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": key, "state": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (also takes version-1 checkpoints' pickled numpy / python states)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["key"], npst["state"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    np.random.set_state(npst)
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rank_states(sums: EpochSums, world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state and partial epoch sums, in rank order (a collective under DDP)."""
    mine = {"rng": rng_state(), "sums": asdict(sums)}
    if world == 1:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


# --------------------------------------------------------------------------- contents, in one place


def training_checkpoint(
    *,
    cfg: dict[str, Any],
    model_kwargs: dict[str, Any],
    classes: list[str],
    model: torch.nn.Module,
    model_ema: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    progress: Progress,
    rank_states: list[dict[str, Any]],
) -> dict[str, Any]:
    """The dict every training checkpoint holds. ``epoch`` / ``metrics`` keep their version-1 meaning
    for epoch checkpoints (the finished epoch and its row)."""
    p = asdict(progress)
    return {
        "version": VERSION,
        "model_name": cfg["model"],
        "model_kwargs": model_kwargs,
        "model": model.state_dict(),
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": cfg,
        "classes": list(classes),
        "progress": p,
        "epoch": progress.epoch if progress.batches_done else progress.epoch - 1,
        "num_updates": progress.num_updates,
        "best_top1": progress.best_top1,
        "metrics": progress.history[-1] if progress.history and not progress.batches_done else None,
        "rng": [r["rng"] for r in rank_states],
        "rank_sums": [r["sums"] for r in rank_states],
    }


def restore_training_state(ckpt: dict[str, Any], *, model_ema: Any, optimizer: Any, scheduler: Any, scaler: Any,
                           rank: int, updates_per_epoch: int) -> tuple[Progress, EpochSums]:
    """Load optimiser, scheduler, EMA, scaler and this rank's RNG from ``ckpt`` (the weights are
    loaded by the caller, before DDP wraps the model). Returns where to continue."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if model_ema is not None and ckpt.get("model_ema") is not None:
        model_ema.module.load_state_dict(ckpt["model_ema"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if "progress" in ckpt:
        progress = Progress(**ckpt["progress"])
    else:  # version 1: epoch checkpoints only
        start = int(ckpt["epoch"]) + 1
        progress = Progress(epoch=start, num_updates=int(ckpt.get("num_updates", start * updates_per_epoch)),
                            best_top1=float(ckpt.get("best_top1", -math.inf)))
    rngs, sums = ckpt["rng"], ckpt.get("rank_sums")
    # a different world size cannot continue each rank's stream exactly; reuse rank 0's
    same_world = rank < len(rngs)
    set_rng_state(rngs[rank] if same_world else rngs[0])
    epoch_sums = EpochSums(**sums[rank]) if (sums and same_world and progress.batches_done) else EpochSums()
    return progress, epoch_sums


# --------------------------------------------------------------------------- writing


def save_checkpoint(obj: dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` atomically: a temp file, flushed to disk, then renamed over ``path``.
    A crash or kill at any moment leaves either the old file or the new one, never a partial one.

    Raises:
        UserError: the disk is full or the folder not writable (the previous ``path`` is untouched).
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except OSError as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        why = "disk full" if err.errno == errno.ENOSPC else (err.strerror or type(err).__name__)
        raise UserError(f"could not write checkpoint '{path}': {why}; the previous checkpoint there is untouched") from None


def _fsync_dir(path: str) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_number(path: str) -> int:
    """The optimiser-step count in a step checkpoint's name (``step_<updates>.pt``)."""
    return int(STEP_PATTERN.search(path).group(1))


def step_checkpoints(output: str) -> list[str]:
    """The step checkpoints in ``output``, oldest first."""
    found = [p for p in glob.glob(os.path.join(output, "step_*.pt")) if STEP_PATTERN.search(p)]
    return sorted(found, key=step_number)


def save_step_checkpoint(obj: dict[str, Any], output: str, keep_last: int) -> str:
    """Write ``step_<updates>.pt`` and delete the oldest step files beyond ``keep_last``."""
    path = os.path.join(output, f"step_{obj['num_updates']:08d}.pt")
    save_checkpoint(obj, path)
    for old in step_checkpoints(output)[:-keep_last]:
        os.remove(old)
    return path


def remove_step_checkpoints(output: str) -> None:
    """After an epoch checkpoint, the step files of that epoch are older than ``last.pt``: drop them."""
    for old in step_checkpoints(output):
        os.remove(old)


# --------------------------------------------------------------------------- reading


def trusted_by_env() -> bool:
    return os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes", "on")


def _needs_pickle(path: str) -> bool:
    """A torch zip archive or a raw pickle: readable, but only by the full unpickler."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # the pickle protocol opcode


def load_checkpoint(path: str, *, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True`` (or, when ``trust`` or the
    environment says the file is trusted, with the full unpickler).

    Raises:
        UserError: missing, empty, truncated or not a checkpoint, or needs pickle and is not trusted.
    """
    if os.path.isdir(path):
        path = latest_checkpoint(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint '{path}' is empty")
    from ..models.checkpoint import read_checkpoint  # the one torch.load of the project (Namespace allowed)

    trusted = trust or trusted_by_env()
    try:
        ckpt = read_checkpoint(path, weights_only=not trusted)
    except ValueError:  # read_checkpoint's weights-only refusal; junk bytes are refused the same way
        if _needs_pickle(path):
            raise UserError(f"checkpoint '{path}' holds pickled Python objects that could run code, so it was not loaded; {TRUST_HINT}") from None
        raise UserError(f"checkpoint '{path}' could not be read (truncated, or not a PyTorch checkpoint): UnpicklingError") from None
    except Exception as err:  # zip, pickle and EOF errors of many kinds
        raise UserError(f"checkpoint '{path}' could not be read (truncated, or not a PyTorch checkpoint): {type(err).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint '{path}' holds no model state dict")
    return ckpt


def latest_checkpoint(output: str) -> str:
    """The newest resumable checkpoint in a run folder: its newest step file, unless ``last.pt`` is
    newer (an epoch finished after it)."""
    candidates = step_checkpoints(output)
    last = os.path.join(output, "last.pt")
    if os.path.isfile(last):
        candidates.append(last)
    if not candidates:
        raise UserError(f"'{output}' holds no checkpoint (last.pt or step_*.pt) to resume from")
    return max(candidates, key=os.path.getmtime)


# --------------------------------------------------------------------------- the rest of a run folder


def prepare_output(output: str) -> None:
    """Create the output folder and check that we can write there (before any training)."""
    try:
        os.makedirs(output, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder '{output}': {err.strerror or type(err).__name__}") from None


RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png")


def holds_run(folder: str) -> bool:
    """Whether ``folder`` has a run's files (finished or not)."""
    return any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES) or bool(step_checkpoints(folder))


def free_name(folder: str) -> str:
    """``folder`` with the first ``-2``, ``-3``, ... suffix that names nothing yet."""
    n = 2
    while os.path.exists(f"{folder}-{n}"):
        n += 1
    return f"{folder}-{n}"


def claim_output(output: str, *, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a run over another one: ``output`` may hold a run only when this run resumes
    it, or when the user said ``--overwrite`` (then its run files are removed first).

    Raises:
        UserError: naming ``--resume``, a free folder name and ``--overwrite``.
    """
    if not holds_run(output):
        return
    if resume is not None:
        resumed = resume if os.path.isdir(resume) else os.path.dirname(resume) or "."
        if os.path.realpath(resumed) == os.path.realpath(output):
            return
    if not overwrite:
        raise UserError(f"output folder '{output}' already holds a run: continue it with --resume {output}, "
                        f"start a new one with --output {free_name(output)}, or replace it with --overwrite")
    for name in [*RUN_FILES, *map(os.path.basename, step_checkpoints(output))]:
        path = os.path.join(output, name)
        if os.path.exists(path):
            os.remove(path)


def write_metrics(path: str, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with exactly ``rows``."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def tensorboard_writer(output: str) -> Any:
    """A SummaryWriter on ``output/tb``, or None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(os.path.join(output, "tb"))
