"""One training epoch and one evaluation pass (DDP-aware, AMP, accumulation, non-finite guard)."""

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

from .config import UserError


class NonFiniteLossError(UserError):
    """Too many consecutive non-finite losses: the run stops, keeping the last good checkpoint."""


class Interrupted(Exception):
    """SIGTERM / SIGINT arrived; raised between steps so the partial epoch is abandoned cleanly."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class StepState:
    """Counters that persist across epochs (and are checkpointed)."""

    num_updates: int = 0
    nonfinite_streak: int = 0
    stop_signal: int | None = None  # set by the signal handler; checked between steps
    skipped_images: int = 0
    log: Callable[[str], None] = field(default=print)


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
) -> dict[str, float]:
    """Train for one epoch. Returns train_loss (mean over finite steps), images, seconds, lr.

    Raises:
        Interrupted: a stop signal arrived (checked between micro-batches).
        NonFiniteLossError: ``cfg['max_nonfinite']`` non-finite losses in a row.
    """
    model.train()
    accum = cfg["accum_steps"]
    n_batches = len(loader)
    updates_per_epoch = max(1, n_batches // accum)
    loss_sum, loss_count, images = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_batches, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y, skipped) in enumerate(loader):
        if state.stop_signal is not None and not _dist():
            raise Interrupted(state.stop_signal)
        state.skipped_images += skipped
        if len(x) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            if len(x) % 2:  # timm's batch mixup pairs samples; only happens after skipped images
                x, y = x[:-1], y[:-1]
            x, y = mixup_fn(x, y)
        is_update = (i + 1) % accum == 0 or i + 1 == n_batches
        # DDP: skip the gradient all-reduce on micro-batches that do not end in an optimizer step
        sync_ctx = model.no_sync() if (hasattr(model, "no_sync") and not is_update) else contextlib.nullcontext()
        with sync_ctx:
            with autocast_ctx(device, cfg["amp"], cfg["amp_dtype"]):
                out = model(x)
                loss = criterion(out.float(), y)
            # [not finite, stop requested]; under DDP every rank must take the same branch, or the
            # next gradient all-reduce hangs, so the flags are max-reduced over ranks
            flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(state.stop_signal is not None))])
            if _dist():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            not_finite, stop = flags.tolist()
            if stop:
                raise Interrupted(state.stop_signal or signal.SIGTERM)
            if not_finite:
                state.nonfinite_streak += 1
                state.log(f"warning: non-finite loss at epoch {epoch} step {i}; step skipped ({state.nonfinite_streak} in a row)")
                optimizer.zero_grad(set_to_none=True)
                if state.nonfinite_streak >= cfg["max_nonfinite"]:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_streak} non-finite losses in a row at epoch {epoch}; stopping "
                        "(last good checkpoint kept; try a lower --lr, --clip-grad or --amp off)"
                    )
                continue
            state.nonfinite_streak = 0
            scaled = loss / accum
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum += loss.item()
        loss_count += 1
        images += len(x)
        if is_update:
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
        lr = optimizer.param_groups[0]["lr"]
        ips = images / max(time.perf_counter() - t0, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
            bar.update(1)
        elif (i + 1) % cfg["log_interval"] == 0:
            state.log(f"epoch {epoch} [{i + 1}/{n_batches}] loss {loss.item():.4f} lr {lr:.3e} {ips:.0f} img/s")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    loss_sum, loss_count, images = _all_sum([loss_sum, loss_count, images], device)
    return {
        "train_loss": loss_sum / loss_count if loss_count else math.nan,
        "images": int(images),
        "seconds": seconds,
        "lr": optimizer.param_groups[0]["lr"],
        "updates_per_epoch": updates_per_epoch,
    }


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
