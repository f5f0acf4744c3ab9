"""One training epoch and one evaluation pass (DDP-aware, AMP, accumulation, non-finite guard).

The epoch loop stops at accumulation boundaries (no half-accumulated gradients) to save a step
checkpoint when the caller's clock says so or a stop signal arrived; under DDP those decisions are
max-reduced over ranks with the non-finite flag, so every rank saves and stops at the same step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .checkpointing import EpochSums
from .progress import EpochProgress


class NonFiniteLossError(UserError):
    """Too many consecutive non-finite losses: the run stops, keeping the last good state.

    ``epoch`` / ``batches_done`` say where: the weights are those before the first of the streak
    (skipped steps change nothing), so a step checkpoint at that position is the last good state.
    """

    def __init__(self, message: str, epoch: int = 0, batches_done: int = 0) -> None:
        super().__init__(message)
        self.epoch, self.batches_done = epoch, batches_done


class Interrupted(Exception):
    """A stop signal arrived; raised at an accumulation boundary, after the step checkpoint."""

    def __init__(self, signum: int, epoch: int = 0, batches_done: int = 0) -> None:
        super().__init__(signum)
        self.signum, self.epoch, self.batches_done = signum, epoch, batches_done


@dataclass
class StepState:
    """What the epoch loop shares with the trainer: counters that persist across epochs (and are
    checkpointed), the stop flag set by the signal handler, and the step-checkpoint hooks."""

    num_updates: int = 0
    nonfinite_streak: int = 0
    nonfinite_steps: int = 0  # micro-batches skipped for a non-finite loss, over the run
    stop_signal: int | None = None  # set by the signal handler; checked every micro-batch
    skipped_images: int = 0
    log: Callable[[str], None] = field(default=print)
    sums: EpochSums = field(default_factory=EpochSums)  # this rank's sums of the epoch in progress
    checkpoint_due: Callable[[], bool] = field(default=lambda: False)  # the --checkpoint-every clock
    save_step: Callable[[int, int], None] | None = None  # (epoch, batches_done) -> writes a step checkpoint
    rank: int = 0


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist():
        dist.all_reduce(t)
    return t.tolist()


def autocast_ctx(device: torch.device, amp: bool, amp_dtype: str) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp_dtype))


@dataclass(frozen=True)
class Agreement:
    """What every process decided together about one micro-batch (each flag max-reduced over ranks)."""

    not_finite: bool = False  # some rank's loss is NaN / inf: every rank drops the micro-batch
    stop: bool = False  # a stop signal arrived on some rank
    save: bool = False  # some rank's checkpoint clock is due
    some_empty: bool = False  # some rank had no readable images: every rank drops the micro-batch

    @property
    def dropped(self) -> bool:
        return self.not_finite or self.some_empty


def agree(loss: torch.Tensor | None, state: StepState, device: torch.device) -> Agreement:
    """The micro-batch's flags, max-reduced over DDP ranks: every rank must take the same branch (or
    the next all-reduce hangs), so a rank whose images were all unreadable has no loss but still takes
    part. The flags stay on the device: one host read."""
    asked = [float(state.stop_signal is not None), float(state.checkpoint_due())]
    if loss is not None:
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), *map(loss.new_tensor, asked), loss.new_tensor(0.0)])
    else:
        flags = torch.tensor([0.0, *asked, 1.0], device=device)
    if _dist():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return Agreement(*(bool(v) for v in flags.tolist()))


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, optimizer: torch.optim.Optimizer,
         cfg: dict[str, Any], device: torch.device, state: StepState, *, epoch: int, i: int, is_update: bool,
         mixup_fn: Callable | None = None, scaler: Any = None) -> tuple[torch.Tensor | None, Agreement]:
    """One micro-batch: forward, the ranks' agreement on it, then backward (or drop it). Returns the loss
    (None when there was none or it was dropped) and the agreement."""
    if not (len(x) or _dist()):
        return None, Agreement()
    # DDP: skip the gradient all-reduce on micro-batches that do not end in an optimizer step
    with model.no_sync() if (hasattr(model, "no_sync") and not is_update) else contextlib.nullcontext():
        loss = None
        if len(x):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            with autocast_ctx(device, cfg["amp"], cfg["amp_dtype"]):
                loss = criterion(model(x).float(), y)
        agreed = agree(loss, state, device)
        if agreed.some_empty:  # drop this micro-batch and its accumulation group on every rank
            state.log(f"warning: epoch {epoch} step {i}: a process had no readable images; step skipped on every process")
            optimizer.zero_grad(set_to_none=True)
            return None, agreed
        if agreed.not_finite:
            _skip_nonfinite(state, optimizer, cfg, epoch, i)
            return None, agreed
        state.nonfinite_streak = 0
        scaled = loss / cfg["accum_steps"]
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss, agreed


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    epoch: int,
    cfg: dict[str, Any],
    device: torch.device,
    state: StepState,
    scheduler: Any = None,
    mixup_fn: Callable | None = None,
    model_ema: Any = None,
    scaler: Any = None,
    progress: bool = False,
    start_batch: int = 0,
) -> dict[str, float]:
    """Train for one epoch, or its remainder from micro-batch ``start_batch`` (the loader then yields
    only the remaining batches, and ``state.sums`` holds the sums of those before). ``progress``: a
    progress bar (else a log line every ``log_interval`` batches, at least 4 an epoch). Returns
    train_loss (mean over finite steps), images, seconds, lr.

    Raises:
        Interrupted: a stop signal arrived (after the step checkpoint at the next boundary).
        NonFiniteLossError: ``cfg['max_nonfinite']`` non-finite losses in a row.
    """
    model.train()
    accum, n_batches, sums = cfg["accum_steps"], start_batch + len(loader), state.sums
    t0 = time.perf_counter() - sums.seconds
    report = EpochProgress(epoch, n_batches, start_batch, cfg["log_interval"], state.log, bar=progress)
    save_due = stop = False
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, skipped) in enumerate(loader, start=start_batch):
        state.skipped_images += skipped
        is_update = (i + 1) % accum == 0 or i + 1 == n_batches
        if mixup_fn is not None and len(x) % 2:  # timm's batch mixup pairs samples; only after skipped images
            x, y = x[:-1], y[:-1]
        loss, agreed = step(model, x, y, criterion, optimizer, cfg, device, state, epoch=epoch, i=i,
                            is_update=is_update, mixup_fn=mixup_fn, scaler=scaler)
        stop, save_due = stop or agreed.stop, save_due or agreed.save or agreed.stop
        loss_value = loss.item() if loss is not None else math.nan  # one host read per micro-batch
        if loss is not None:
            sums.loss_sum += loss_value
            sums.loss_count += 1
            sums.images += len(x)
        if is_update:
            if not agreed.dropped:  # a group ending in a dropped micro-batch takes no step (its gradients are gone)
                _optimizer_step(model, optimizer, cfg, state, scheduler, model_ema, scaler)
            if save_due:
                sums.seconds = time.perf_counter() - t0
                if state.save_step is not None:
                    state.save_step(epoch, i + 1)
                save_due = False
            if stop:
                raise Interrupted(state.stop_signal or signal.SIGTERM, epoch, i + 1)
        report.update(i + 1, loss_value, optimizer.param_groups[0]["lr"], sums.images / max(time.perf_counter() - t0, 1e-9))
    report.close()
    sums.seconds = time.perf_counter() - t0
    loss_sum, loss_count, images = _all_sum([sums.loss_sum, sums.loss_count, sums.images], device)
    return {
        "train_loss": loss_sum / loss_count if loss_count else math.nan,
        "images": int(images),
        "seconds": sums.seconds,
        "lr": optimizer.param_groups[0]["lr"],
        "updates_per_epoch": max(1, n_batches // accum),
    }


def _skip_nonfinite(state: StepState, optimizer: torch.optim.Optimizer, cfg: dict[str, Any], epoch: int, i: int) -> None:
    """Drop this micro-batch's gradients (and its accumulation group's so far); stop after too many."""
    state.nonfinite_streak += 1
    state.nonfinite_steps += 1
    state.log(f"warning: non-finite loss at epoch {epoch} step {i}; step skipped ({state.nonfinite_streak} in a row)")
    optimizer.zero_grad(set_to_none=True)
    if state.nonfinite_streak >= cfg["max_nonfinite"]:
        raise NonFiniteLossError(
            f"{state.nonfinite_streak} non-finite losses in a row at epoch {epoch} step {i}; stopping "
            "(try a lower --lr, --clip-grad or --amp false)", epoch, i + 1,
        )


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: dict[str, Any], state: StepState,
                    scheduler: Any, model_ema: Any, scaler: Any) -> None:
    """Clip, step (through the scaler for fp16), update EMA and the per-update lr schedule."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg["clip_grad"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.num_updates += 1
    if model_ema is not None:
        model_ema.update(_unwrap(model), step=state.num_updates)
    if scheduler is not None and cfg["sched_on_updates"]:
        scheduler.step_update(num_updates=state.num_updates)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy, image count and images/s over the
    whole loader (summed over DDP ranks; the sampler must shard without padding)."""
    model.eval()
    correct1 = correct5 = loss_sum = n = skipped = 0.0
    t0 = time.perf_counter()
    for x, y, sk in loader:
        skipped += sk
        if len(x) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_ctx(device, amp, amp_dtype):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        k = min(5, out.shape[1])
        topk = out.topk(k, dim=1).indices  # (B, k)
        hits = topk.eq(y[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += len(y)
    seconds = time.perf_counter() - t0
    correct1, correct5, loss_sum, n, skipped = _all_sum([correct1, correct5, loss_sum, n, skipped], device)
    if n == 0:
        raise UserError("evaluation set yielded no readable images")
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "images": int(n),
        "skipped": int(skipped),
        "seconds": seconds,
        "images_per_second": n / max(seconds, 1e-9),
    }
