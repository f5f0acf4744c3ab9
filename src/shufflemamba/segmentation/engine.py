"""Segmentation training and evaluation, counted in iterations as the reference's 160k schedule.

A run, read top to bottom (:func:`train_segmentation`): processes, data, model (backbone from
``pretrained`` / ``init_from``), AdamW with the reference's no-decay keys, then iterations: lr from
the warmup + poly schedule, forward, loss (decode head + ``aux_weight`` x auxiliary head), backward,
step. Every ``val_interval`` iterations and at the end: evaluate (mIoU, mAcc, aAcc), append a row to
``metrics.jsonl``, redraw ``curves.png``, write ``last.pt`` (and ``best.pt`` on a better mIoU).
Between evaluations a step checkpoint ``step_<iter>.pt`` is written every ``checkpoint_every``
minutes and on SIGTERM / SIGINT / SIGUSR1 (then the run exits with 128 + signal). ``--resume RUN``
continues from the newest one exactly: the same data order and crops (seeded by position), the
same RNG states, the lr where it was. The loss is mmseg's default: per-pixel cross-entropy averaged
over all pixels of the batch, ignored ones counting as 0 (``avg_non_ignore`` false).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..training.checkpointing import (
    latest_checkpoint, load_training_checkpoint, prepare_output, remove_step_checkpoints, rng_state, save_checkpoint,
    save_step_checkpoint, set_rng_state, step_checkpoints, step_number, write_metrics,
)
from ..errors import UserError
from ..training.config import dump_config, resolve_amp
from ..training.distributed import SignalCatcher, setup_distributed, teardown_distributed, write_output_on_rank0
from .config import validate_seg_config
from .data import SegDataError, build_seg_data
from .export import is_seg_export, load_seg_export
from .figures import plot_predictions, plot_seg_curves
from .inference import predict_logits
from .metrics import confusion_matrix, seg_metrics
from .model import UperNetSegmentor, build_segmentor

VERSION = 1


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (``stop_signal`` excepted)."""

    iteration: int = 0
    best_miou: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0  # since the last evaluation
    loss_steps: int = 0
    images: int = 0
    seconds: float = 0.0
    nonfinite_streak: int = 0
    nonfinite_steps: int = 0
    stop_signal: int | None = None

    def saved(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("stop_signal")
        return out


def lr_factor(iteration: int, cfg: dict[str, Any]) -> float:
    """Linear warmup from ``warmup_ratio`` over ``warmup_iters``, then poly (``poly_power``) from 1 to
    ``min_lr / lr`` at ``iters`` (mmengine's LinearLR then PolyLR)."""
    warm = cfg["warmup_iters"]
    if iteration < warm:
        return cfg["warmup_ratio"] + (1.0 - cfg["warmup_ratio"]) * iteration / warm
    floor = cfg["min_lr"] / cfg["lr"]
    progress = min((iteration - warm) / max(cfg["iters"] - warm, 1), 1.0)
    return (1.0 - floor) * (1.0 - progress) ** cfg["poly_power"] + floor


def param_groups(model: nn.Module, weight_decay: float, no_decay_keys: list[str]) -> list[dict[str, Any]]:
    """Two groups: names containing any of ``no_decay_keys`` (mmengine custom_keys, matched by
    substring) get no decay; everything else, biases and BatchNorm included, decays."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none").mean()


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on some rank (so every rank takes the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _data_error(err: Exception) -> UserError:
    """A dataset error raised in a loader worker arrives as a multi-line text: keep its own line."""
    last = str(err).strip().splitlines()[-1]
    return UserError(last.split(": ", 1)[1] if "SegDataError: " in last else last)


@contextlib.contextmanager
def _data_errors():
    """A SegDataError raised in the body, or re-raised from a loader worker (a RuntimeError carrying its
    traceback in the text), becomes one UserError; any other error passes as it is."""
    try:
        yield
    except SegDataError as err:
        raise _data_error(err) from None
    except RuntimeError as err:
        if "SegDataError" in str(err):
            raise _data_error(err) from None
        raise


@torch.no_grad()
def evaluate_seg(model: nn.Module, loader: Any, cfg: dict[str, Any], num_classes: int, device: torch.device) -> dict[str, Any]:
    """mIoU / mAcc / aAcc (%) and val loss over this rank's share of the validation images (summed
    over ranks under DDP), predictions at each image's original size."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    sums = torch.zeros(3, dtype=torch.float64)  # loss x pixels, labelled pixels, images
    with _data_errors():
        for sample in loader:
            image, mask = sample["image"].unsqueeze(0).to(device), sample["mask"].to(device)
            logits = predict_logits(model, image, num_classes, mode=cfg["test_mode"], crop=cfg["test_crop"],
                                    stride=cfg["test_stride"], out_size=mask.shape, amp=cfg["amp"], amp_dtype=cfg["amp_dtype"])
            labelled = int((mask != cfg["ignore_index"]).sum())
            if labelled:
                sums[0] += float(F.cross_entropy(logits, mask[None], ignore_index=cfg["ignore_index"], reduction="sum"))
            sums[1] += labelled
            sums[2] += 1
            conf += confusion_matrix(logits.argmax(1)[0], mask, num_classes, cfg["ignore_index"])
    if dist.is_available() and dist.is_initialized():
        both = torch.cat([conf.flatten().double(), sums]).to(device)
        dist.all_reduce(both)
        both = both.cpu()
        conf, sums = both[: num_classes**2].round().long().reshape(num_classes, num_classes), both[num_classes**2:]
    out = seg_metrics(conf)
    out["val_loss"] = float(sums[0] / max(sums[1], 1))
    out["images"] = int(sums[2])
    return out


@torch.no_grad()
def save_prediction_figure(model: nn.Module, val_set: Any, cfg: dict[str, Any], num_classes: int, classes: list[str],
                           device: torch.device, path: str) -> str | None:
    """The first ``demo_figure`` validation images with their true and predicted masks."""
    n = min(cfg["demo_figure"], len(val_set))
    if n == 0:
        return None
    model.eval()
    rows = []
    for i in range(n):
        s = val_set[i]
        logits = predict_logits(model, s["image"].unsqueeze(0).to(device), num_classes, mode=cfg["test_mode"],
                                crop=cfg["test_crop"], stride=cfg["test_stride"], out_size=s["mask"].shape,
                                amp=cfg["amp"], amp_dtype=cfg["amp_dtype"])
        rows.append((s["raw"], s["mask"].numpy(), logits.argmax(1)[0].cpu().numpy(), s["name"]))
    return plot_predictions(rows, path, num_classes=num_classes, ignore_index=cfg["ignore_index"], classes=classes)


class SegTrainer:
    """One segmentation run on this process."""

    def __init__(self, cfg: dict[str, Any], rank: int, world: int, device: torch.device, resuming: bool) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.output = cfg["output"]
        torch.manual_seed(cfg["seed"])  # the same init on every rank
        np.random.seed(cfg["seed"] % 2**32)
        self.data = build_seg_data(cfg, rank, world, train=True)
        self.num_classes = self.data["num_classes"]
        if not resuming and cfg["num_classes"] is None:
            cfg["num_classes"] = self.num_classes  # stored, so eval and resume rebuild the same head
        self.model: UperNetSegmentor = build_segmentor(cfg, self.num_classes, log=self.log if not resuming else lambda m: None)
        if world > 1 and cfg["sync_bn"] and device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(device)
        fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg["weight_decay"], cfg["no_decay_keys"]),
                                           lr=cfg["lr"], betas=tuple(cfg["opt_betas"]), **fused)
        self.scaler = torch.amp.GradScaler(device.type) if cfg["amp"] and cfg["amp_dtype"] == "float16" else None
        self.state = RunState()
        self.ddp: nn.Module = self.model
        self.last_save = time.monotonic()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def restore(self, ckpt: dict[str, Any] | None) -> None:
        if ckpt is None:
            torch.manual_seed(self.cfg["seed"] + self.rank)  # dropout / drop-path streams differ per rank
            return
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise UserError(f"checkpoint does not match the segmentation model: {str(err).splitlines()[1].strip()[:200]}") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["state"])
        rngs = ckpt["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            self.log(f"warning: checkpoint written by {len(rngs)} processes, resumed on {self.world}: the data order "
                     "continues, dropout / drop-path draws do not repeat the original run")

    def prepare_output(self, resuming: bool) -> None:
        """Rank 0 writes config.yaml and metrics.jsonl; every rank learns whether that worked."""
        def write() -> None:
            prepare_output(self.output)
            dump_config(self.cfg, os.path.join(self.output, "config.yaml"))
            write_metrics(os.path.join(self.output, "metrics.jsonl"), self.state.history)
            for path in step_checkpoints(self.output):  # files past this start belong to an abandoned run
                if not resuming or step_number(path) > self.state.iteration:
                    os.remove(path)

        write_output_on_rank0(write, rank=self.rank, device=self.device, output=self.output)
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        cfg, st = self.cfg, self.state
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"segmentation: {cfg['model']} + UperNet ({n_params / 1e6:.2f}M params) on {self.device.type} x{self.world}; "
                 f"{len(self.data['train_loader'].dataset)} train / {len(self.data['val_set'])} val images, "
                 f"{self.num_classes} classes ({self.data['info'].layout} layout); batch {cfg['batch_size'] * self.world}, "
                 f"crop {cfg['crop_size']}, lr {cfg['lr']:.3g}; iterations {st.iteration}..{cfg['iters']}")
        bpp = self.data["batches_per_pass"]
        autocast = (lambda: torch.autocast(self.device.type, dtype=getattr(torch, cfg["amp_dtype"]))) if cfg["amp"] \
            else contextlib.nullcontext
        with SignalCatcher(st):
            while st.iteration < cfg["iters"]:
                data_pass, done = divmod(st.iteration, bpp)
                self.data["train_sampler"].set_pass(data_pass, done * cfg["batch_size"])
                t0 = time.perf_counter()
                with _data_errors():
                    for images, masks in self.data["train_loader"]:
                        code = self.step(images, masks, autocast, time.perf_counter() - t0)
                        if code is not None:
                            return code
                        t0 = time.perf_counter()
                        if st.iteration >= cfg["iters"]:
                            break
        self.finish()
        return 0

    def step(self, images: torch.Tensor, masks: torch.Tensor, autocast: Any, load_seconds: float) -> int | None:
        """One optimiser step, then what falls due: log, evaluation, checkpoint, stop."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        lr = cfg["lr"] * lr_factor(st.iteration, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        images, masks = images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
        self.ddp.train()
        with autocast():
            logits, aux = self.ddp(images)
        loss = seg_loss(logits, masks, cfg["ignore_index"])
        if aux is not None:
            loss = loss + cfg["aux_weight"] * seg_loss(aux, masks, cfg["ignore_index"])
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        due = cfg["checkpoint_every"] > 0 and time.monotonic() - self.last_save >= cfg["checkpoint_every"] * 60
        bad, stop, due = _any_rank([not bool(torch.isfinite(loss)), st.stop_signal is not None, due], self.device)
        if bad:
            st.nonfinite_streak += 1
            st.nonfinite_steps += 1
        else:
            st.nonfinite_streak = 0
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg["clip_grad"]:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            st.loss_sum += float(loss.detach())
            st.loss_steps += 1
        st.iteration += 1
        st.images += images.shape[0] * self.world
        st.seconds += time.perf_counter() - t0 + load_seconds
        if st.iteration % cfg["log_interval"] == 0:
            self.log(f"iter {st.iteration}/{cfg['iters']} loss {loss.item():.4f} lr {lr:.3e} "
                     f"{st.images / max(st.seconds, 1e-9):.1f} img/s")
        if st.iteration % cfg["val_interval"] == 0 or st.iteration == cfg["iters"]:
            self.evaluate_and_save()
        elif due or stop or st.nonfinite_streak >= cfg["max_nonfinite"]:
            self.save_step()
        if st.nonfinite_streak >= cfg["max_nonfinite"]:
            raise UserError(f"{st.nonfinite_streak} non-finite losses in a row at iteration {st.iteration}; the last "
                            f"good state is saved: lower --lr and resume with --resume {self.output}")
        if stop:
            signum = st.stop_signal or signal.SIGTERM
            self.log(f"stopped by {signal.Signals(signum).name} at iteration {st.iteration}; "
                     f"continue with: shufflemamba train --task segmentation --resume {self.output}")
            return 128 + signum
        return None

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate_and_save(self) -> None:
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        if self.world > 1:  # BatchNorm running stats as rank 0 (the checkpoint's) has them; without SyncBN they drift apart
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        ev = evaluate_seg(self.model, self.data["val_loader"], cfg, self.num_classes, self.device)
        row = {"iter": st.iteration, "train_loss": st.loss_sum / max(st.loss_steps, 1), "val_loss": ev["val_loss"],
               "mIoU": ev["mIoU"], "mAcc": ev["mAcc"], "aAcc": ev["aAcc"], "lr": self.optimizer.param_groups[0]["lr"],
               "seconds": st.seconds + time.perf_counter() - t0, "images_per_second": st.images / max(st.seconds, 1e-9)}
        if st.nonfinite_steps:
            row["nonfinite_steps"] = st.nonfinite_steps
        is_best = not math.isnan(row["mIoU"]) and row["mIoU"] > st.best_miou
        st.best_miou = max(st.best_miou, row["mIoU"]) if is_best else st.best_miou
        st.history.append(row)
        st.loss_sum, st.loss_steps, st.images, st.seconds = 0.0, 0, 0, 0.0
        ckpt = self.checkpoint()
        if self.rank == 0:
            save_checkpoint(ckpt, os.path.join(self.output, "last.pt"))
            if is_best and cfg["save_best"]:
                save_checkpoint(ckpt, os.path.join(self.output, "best.pt"))
            remove_step_checkpoints(self.output)
            path = os.path.join(self.output, "metrics.jsonl")
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            plot_seg_curves(st.history, os.path.join(self.output, "curves.png"))
        self.last_save = time.monotonic()
        self.log(f"iter {row['iter']}: mIoU {row['mIoU']:.2f} mAcc {row['mAcc']:.2f} aAcc {row['aAcc']:.2f} "
                 f"train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} ({ev['images']} val images)")

    def checkpoint(self) -> dict[str, Any] | None:
        """The current state (a collective under DDP: every rank's RNG state; None off rank 0)."""
        rngs: list[Any] = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return None
        return {
            "version": VERSION, "task": "segmentation", "model_name": self.cfg["model"], "config": self.cfg,
            "num_classes": self.num_classes, "classes": self.data["classes"], "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "state": self.state.saved(), "rng": rngs, "num_updates": self.state.iteration,
        }

    def save_step(self) -> None:
        ckpt = self.checkpoint()
        if ckpt is not None:
            save_step_checkpoint(ckpt, self.output, self.cfg["keep_last"])
        self.last_save = time.monotonic()

    def finish(self) -> None:
        if self.rank != 0 or not self.state.history:
            return
        best = max(self.state.history, key=lambda r: -1 if math.isnan(r["mIoU"]) else r["mIoU"])
        last = self.state.history[-1]
        pics = save_prediction_figure(self.model, self.data["val_set"], self.cfg, self.num_classes, self.data["classes"],
                                      self.device, os.path.join(self.output, "predictions.png"))
        self.log(f"final mIoU {last['mIoU']:.2f} mAcc {last['mAcc']:.2f} aAcc {last['aAcc']:.2f} (iteration {last['iter']}; "
                 f"best mIoU {best['mIoU']:.2f} at {best['iter']}); curves: {os.path.join(self.output, 'curves.png')}"
                 + (f"; predictions: {pics}" if pics else "") + f"; checkpoint: {os.path.join(self.output, 'last.pt')}")


def train_segmentation(cfg: dict[str, Any], resume_ckpt: dict[str, Any] | None = None) -> int:
    """Run the segmentation training ``cfg`` describes (continuing ``resume_ckpt``). Returns an exit code."""
    rank, world, device = setup_distributed(cfg)
    cfg["amp"] = resolve_amp(cfg["amp"], device, cfg["amp_dtype"])
    trainer = None
    try:
        trainer = SegTrainer(cfg, rank, world, device, resuming=resume_ckpt is not None)
        trainer.restore(resume_ckpt)
        trainer.prepare_output(resuming=resume_ckpt is not None)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.ddp = None
        del trainer
        teardown_distributed()


def load_seg_checkpoint(path: str) -> dict[str, Any]:
    """A segmentation checkpoint (a run folder: its newest; an exported folder: its weights and config);
    a classification one is refused."""
    if is_seg_export(path):
        return load_seg_export(path)
    ckpt = load_training_checkpoint(latest_checkpoint(path) if os.path.isdir(path) else path)
    if ckpt.get("task") != "segmentation":
        raise UserError(f"checkpoint '{path}' is not a segmentation run (drop --task segmentation for classification)")
    return ckpt


def evaluate_seg_checkpoint(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a segmentation run's model from its checkpoint and score the validation split of the
    data the overrides (or the run's config) name."""
    ckpt = load_seg_checkpoint(path)
    cfg = dict(ckpt["config"])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg.update(init_from=None, pretrained=False, num_classes=ckpt["num_classes"])
    cfg = validate_seg_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    if cfg["device"] == "cuda" and device.type != "cuda":
        raise UserError("--device cuda requested but no CUDA device is available")
    cfg["amp"] = resolve_amp(cfg["amp"], device, cfg["amp_dtype"])
    data = build_seg_data(cfg, train=False)
    if data["num_classes"] != ckpt["num_classes"]:
        raise UserError(f"checkpoint has {ckpt['num_classes']} classes but the data has {data['num_classes']}")
    model = build_segmentor(cfg, ckpt["num_classes"], log=lambda m: None)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"checkpoint '{path}' does not match its model: {str(err).splitlines()[1].strip()[:200]}") from None
    model.to(device)
    t0 = time.perf_counter()
    out = evaluate_seg(model, data["val_loader"], cfg, ckpt["num_classes"], device)
    out["seconds"] = time.perf_counter() - t0
    out["classes"] = data["classes"]
    return out


def is_seg_run(path: str | None) -> bool:
    """True when ``path`` (a run folder or a checkpoint file in one) has a config.yaml of task segmentation."""
    if not path:
        return False
    if is_seg_export(path):
        return True
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(cfg_path):
        return False
    import yaml

    try:
        with open(cfg_path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("task") == "segmentation"

