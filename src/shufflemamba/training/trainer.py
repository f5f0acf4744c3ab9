"""Training and checkpoint evaluation: the training run, and ``evaluate_checkpoint``.

A run, read top to bottom (:func:`train`): set up the processes; build data, model, optimiser,
schedule and loss (:class:`Trainer`); restore a checkpoint when resuming; then train epoch after
epoch, evaluating, checkpointing and logging at each epoch's end.

What a kill loses: ``last.pt`` / ``best.pt`` are written when an epoch ends; in between, a step
checkpoint ``step_<updates>.pt`` is written every ``checkpoint_every`` minutes and when SIGTERM,
SIGINT or SIGUSR1 arrives (then the run exits with 128 + signal number). A SIGKILL or a crash loses
at most the minutes since the last one. ``--resume OUTPUT`` (or a checkpoint file) continues from
the newest: the rest of the epoch in the same order with the same RNG streams, the lr schedule
where it was, and ``metrics.jsonl`` rewritten from the checkpoint so every epoch appears once.
The contents of a checkpoint are defined in :mod:`shufflemamba.training.checkpointing`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .checkpointing import (
    EpochSums, Progress, claim_output, gather_rank_states, load_training_checkpoint, prepare_output,
    remove_run_files, remove_step_checkpoints,
    restore_training_state, save_checkpoint, save_step_checkpoint, step_checkpoints, step_number, tensorboard_writer,
    training_checkpoint, write_metrics,
)
from ..errors import UserError
from .config import dump_config, resolve_amp
from .data import build_loaders
from .defaults import data_layout, new_run_folder
from .distributed import (SignalCatcher, all_ranks_agree, rank0_value, setup_distributed, teardown_distributed,
                          write_output_on_rank0)
from .engine import Interrupted, NonFiniteLossError, StepState, evaluate, train_one_epoch
from .model_setup import build_model, init_weights, load_weights, model_in_chans, model_kwargs_for
from .optim import build_optimizer
from .plots import plot_curves, read_metrics

COUNTERS = ("num_updates", "nonfinite_streak", "nonfinite_steps", "skipped_images")  # kept by the loop, saved in Progress

__all__ = ["train", "evaluate_checkpoint"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the pieces of a run


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any], updates_per_epoch: int) -> Any:
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg["sched"], num_epochs=max(cfg["epochs"], 1), warmup_epochs=cfg["warmup_epochs"],
        warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=not cfg["sched_on_updates"],
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_loss(cfg: dict[str, Any], num_classes: int) -> tuple[Callable | None, nn.Module]:
    """(mixup / cutmix function or None, the matching criterion)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup_fn = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                         switch_prob=cfg["mixup_switch_prob"], label_smoothing=cfg["smoothing"], num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if cfg["smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return None, nn.CrossEntropyLoss()


class Trainer:
    """One training run on this process: what it trains, where it stands, and how it saves."""

    def __init__(self, cfg: dict[str, Any], rank: int, world: int, device: torch.device, resuming: bool = False) -> None:
        from timm.utils import ModelEmaV3

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.output = cfg["output"]
        seed_everything(cfg["seed"])  # same init on every rank (DDP also broadcasts rank 0's weights)
        self.loaders = build_loaders(cfg, model_in_chans(cfg["model_kwargs"]), rank, world, train=True)
        self.batches_per_epoch = len(self.loaders["train_loader"])
        self.kwargs = model_kwargs_for(cfg, self.loaders["num_classes"])
        self.model = build_model(cfg["model"], self.kwargs).to(device)
        if cfg["init_from"] and not resuming:
            init_weights(self.model, cfg["init_from"], cfg["model"], log=self.log)
        self.total_batch = cfg["batch_size"] * world * cfg["accum_steps"]
        self.lr = cfg["lr"] * self.total_batch / 512 if cfg["scale_lr"] else cfg["lr"]
        self.optimizer = build_optimizer(self.model, cfg, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, max(1, self.batches_per_epoch // cfg["accum_steps"]))
        self.model_ema = ModelEmaV3(self.model, decay=cfg["model_ema_decay"], device=device) if cfg["model_ema"] else None
        use_scaler = cfg["amp"] and cfg["amp_dtype"] == "float16"
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.mixup_fn, self.criterion = build_loss(cfg, self.loaders["num_classes"])
        self.progress = Progress()
        self.state = StepState(log=self.log, rank=rank, checkpoint_due=self._checkpoint_due, save_step=self.save_step)
        self.ddp_model: nn.Module | None = None
        self.writer: Any = None
        self.last_save = time.monotonic()
        self.saved: str | None = None  # the newest checkpoint this run wrote
        self.replace_run = False  # --overwrite found a run in the output folder: removed before writing

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ------------------------------------------------------------------ set-up

    def restore(self, ckpt: dict[str, Any] | None) -> None:
        """Continue from ``ckpt`` (weights, optimiser, schedule, EMA, scaler, RNG, position), or
        start fresh with a different augmentation stream per rank."""
        if ckpt is None:
            seed_everything(self.cfg["seed"] + self.rank)
            return
        if ckpt.get("model_name") != self.cfg["model"]:
            raise UserError(f"checkpoint '{self.cfg['resume']}' is for model '{ckpt.get('model_name')}', not '{self.cfg['model']}'")
        load_weights(self.model, ckpt["model"], self.cfg["model"], self.cfg["resume"])
        if self.model_ema is not None and ckpt.get("model_ema") is None:
            self.model_ema.module.load_state_dict(self.model.state_dict())  # EMA switched on at resume
        self.progress, self.state.sums = restore_training_state(
            ckpt, model_ema=self.model_ema, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            rank=self.rank, updates_per_epoch=max(1, self.batches_per_epoch // self.cfg["accum_steps"]),
        )
        saved_world = len(ckpt["rng"])
        if self.progress.batches_done and saved_world != self.world:  # another order: restart the epoch
            self.log(f"warning: checkpoint written by {saved_world} processes, resumed on {self.world}; "
                     f"epoch {self.progress.epoch} restarts from its first batch")
            self.progress.batches_done, self.state.sums = 0, EpochSums()
        if self.progress.batches_done > self.batches_per_epoch:
            raise UserError(f"checkpoint '{self.cfg['resume']}' is {self.progress.batches_done} batches into an epoch "
                            f"of {self.batches_per_epoch}: the data or batch size changed since it was written")
        for key in COUNTERS:
            setattr(self.state, key, getattr(self.progress, key))

    def prepare_output(self) -> None:
        """Rank 0: output folder, config.yaml, metrics.jsonl as the checkpoint records it, TensorBoard.
        Every rank learns whether that worked, so none is left waiting for the others."""
        def write() -> None:
            prepare_output(self.output)
            if self.replace_run:  # --overwrite: only now that the new run is built and can start
                remove_run_files(self.output)
            dump_config(self.cfg, os.path.join(self.output, "config.yaml"))
            self._reset_metrics_file()
            self._drop_stale_step_checkpoints()

        write_output_on_rank0(write, rank=self.rank, device=self.device, output=self.output)
        if self.rank == 0:
            self.writer = tensorboard_writer(self.output)

    def _reset_metrics_file(self) -> None:
        path = os.path.join(self.output, "metrics.jsonl")
        rows = self.progress.history  # version-1 checkpoints kept none: keep the file's earlier epochs
        if not rows:
            rows = [r for r in read_metrics(path) if r.get("epoch", -1) < self.progress.epoch]
        write_metrics(path, rows)

    def _drop_stale_step_checkpoints(self) -> None:
        """Step files past where this run starts belong to an abandoned future (or an earlier run in
        this folder): left there, they would look newer than this run's own."""
        stale = [p for p in step_checkpoints(self.output)
                 if self.progress.num_updates == 0 or step_number(p) > self.progress.num_updates]
        for path in stale:
            os.remove(path)
        if stale:
            self.log(f"removed {len(stale)} step checkpoint(s) in {self.output} newer than this run's start")

    def wrap_ddp(self) -> None:
        self.ddp_model = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train the remaining epochs. Returns the exit code (128 + signal when stopped by one)."""
        if self.progress.epoch >= self.cfg["epochs"] and not self.progress.batches_done:
            self.log(f"the run in {self.output} has finished its {self.cfg['epochs']} epochs: nothing to train "
                     f"(to train longer, resume with --epochs N, N > {self.cfg['epochs']})")
            return 0
        self.log(self._summary())
        if self.device.type == "cpu":
            from ..process import describe_wait_policy

            self.log(describe_wait_policy())
        with SignalCatcher(self.state):
            try:
                while self.progress.epoch < self.cfg["epochs"]:
                    stats = self.train_epoch()
                    self.end_epoch(stats)
                    more = self.progress.epoch < self.cfg["epochs"]  # a signal during the last evaluation changes nothing
                    if more and not all_ranks_agree(self.state.stop_signal is None, self.device):
                        raise Interrupted(self.state.stop_signal or signal.SIGTERM, self.progress.epoch, 0)
            except Interrupted as intr:
                return self._stopped(intr)
            except NonFiniteLossError as err:
                self._save_last_good_state(err)
        self.log(self._final_line())
        return 0

    def train_epoch(self) -> dict[str, float]:
        """The current epoch, or what is left of it after a resume."""
        p = self.progress
        if p.batches_done == 0:
            self.state.sums = EpochSums()
        self.loaders["train_sampler"].set_epoch(p.epoch, start=p.batches_done * self.cfg["batch_size"])
        return train_one_epoch(
            self.ddp_model, self.loaders["train_loader"], self.optimizer, self.criterion, p.epoch, self.cfg, self.device,
            self.state, scheduler=self.scheduler, mixup_fn=self.mixup_fn, model_ema=self.model_ema, scaler=self.scaler,
            progress=self.rank == 0 and sys.stderr.isatty(), start_batch=p.batches_done,  # tqdm writes to stderr
        )

    def end_epoch(self, tr: dict[str, float]) -> None:
        """Evaluate, then checkpoint (with this epoch's row in its history), then log the row."""
        p, cfg = self.progress, self.cfg
        self.scheduler.step(p.epoch + 1)  # per-epoch schedulers; a no-op when stepping on updates
        t_eval = time.perf_counter()
        ev = evaluate(self.model, self.loaders["val_loader"], self.device, cfg["amp"], cfg["amp_dtype"])
        row = {
            "epoch": p.epoch, "train_loss": tr["train_loss"], "val_loss": ev["loss"], "val_top1": ev["top1"],
            "val_top5": ev["top5"], "lr": tr["lr"], "epoch_seconds": tr["seconds"] + time.perf_counter() - t_eval,
            "images_per_second": tr["images"] / max(tr["seconds"], 1e-9),
        }
        if self.model_ema is not None:
            row["ema_top1"] = evaluate(self.model_ema.module, self.loaders["val_loader"], self.device, cfg["amp"], cfg["amp_dtype"])["top1"]
        for key in ("skipped_images", "nonfinite_steps"):  # over the run so far; absent when none
            if getattr(self.state, key):
                row[key] = getattr(self.state, key)
        if ev.get("skipped"):
            row["skipped_val_images"] = ev["skipped"]  # unreadable images of this evaluation
        is_best = row["val_top1"] > p.best_top1
        p.best_top1 = max(p.best_top1, row["val_top1"])
        p.history.append(row)
        p.epoch, p.batches_done = p.epoch + 1, 0
        self.save_epoch(is_best)
        self.record(row)

    # ------------------------------------------------------------------ checkpoints and records

    def checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint of the current state (a collective under DDP; None on ranks other than 0)."""
        for key in COUNTERS:
            setattr(self.progress, key, getattr(self.state, key))
        rank_states = gather_rank_states(self.state.sums, self.world)
        if self.rank != 0:
            return None
        return training_checkpoint(
            cfg=self.cfg, model_kwargs=self.kwargs, classes=self.loaders["classes"], model=self.model,
            model_ema=self.model_ema, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            progress=self.progress, rank_states=rank_states,
        )

    def save_epoch(self, is_best: bool) -> None:
        ckpt = self.checkpoint()
        if ckpt is not None:
            self.saved = os.path.join(self.output, "last.pt")
            save_checkpoint(ckpt, self.saved)
            if is_best and self.cfg["save_best"]:
                save_checkpoint(ckpt, os.path.join(self.output, "best.pt"))
            remove_step_checkpoints(self.output)
        self.last_save = time.monotonic()

    def save_step(self, epoch: int, batches_done: int) -> str | None:
        """Mid-epoch checkpoint after ``batches_done`` micro-batches of ``epoch`` (called by the loop)."""
        self.progress.epoch, self.progress.batches_done = epoch, batches_done
        ckpt = self.checkpoint()
        path = None
        if ckpt is not None:
            path = self.saved = save_step_checkpoint(ckpt, self.output, self.cfg["keep_last"])
        self.last_save = time.monotonic()
        return path

    def _checkpoint_due(self) -> bool:
        every = self.cfg["checkpoint_every"]
        return every > 0 and time.monotonic() - self.last_save >= every * 60

    def record(self, row: dict[str, Any]) -> None:
        """metrics.jsonl, curves.png, TensorBoard and the log line of a finished epoch."""
        if self.rank == 0:
            metrics_path = os.path.join(self.output, "metrics.jsonl")
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            plot_curves(read_metrics(metrics_path), os.path.join(self.output, "curves.png"))
            if self.writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        self.writer.add_scalar(k, v, row["epoch"])
                self.writer.flush()
        ema = f" ema_top1 {row['ema_top1']:.2f}" if "ema_top1" in row else ""
        self.log(
            f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"val_top1 {row['val_top1']:.2f} val_top5 {row['val_top5']:.2f}{ema} lr {row['lr']:.3e} "
            f"{row['epoch_seconds']:.1f}s {row['images_per_second']:.0f} img/s"
        )

    # ------------------------------------------------------------------ endings

    def _stopped(self, intr: Interrupted) -> int:
        name = signal.Signals(intr.signum).name
        where = (f"at epoch {intr.epoch}, batch {intr.batches_done} of {self.batches_per_epoch}"
                 if intr.batches_done else f"after epoch {intr.epoch - 1}")
        self.log(f"stopped by {name} {where}; saved {self.saved}; continue with: shufflemamba train --resume {self.output}")
        return 128 + intr.signum

    def _save_last_good_state(self, err: NonFiniteLossError) -> None:
        """Too many non-finite losses: skipped steps changed nothing, so the current weights are the
        last good ones (unless they are themselves non-finite). Save them, then stop with one line."""
        finite = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point())
        where = "the last checkpoint in it"
        if all_ranks_agree(finite, self.device):
            self.state.nonfinite_streak = 0  # a resumed run (say with a lower lr) starts a fresh count
            path = self.save_step(err.epoch, err.batches_done)
            where = path or "a step checkpoint"
        raise NonFiniteLossError(f"{err}; the last good state is in {where}: resume with --resume {self.output}") from None

    def _final_line(self) -> str:
        """The last line of a run: the final and the best epoch on the validation split, and the files."""
        history = self.progress.history
        if not history:
            return f"no epoch finished; run folder: {self.output}"
        split = "held-out val" if self.cfg.get("holdout") else "val"  # with a holdout, val/ stays unseen
        last, best = history[-1], max(history, key=lambda r: r["val_top1"])
        where = (f"best {best['val_top1']:.2f}% at epoch {best['epoch']} (best.pt)"
                 if best is not last and self.cfg["save_best"] else "the best epoch")
        return (f"final {split} top-1 {last['val_top1']:.2f}% at epoch {last['epoch']}, {where}; "
                f"run folder {self.output} (last.pt, best.pt, metrics.jsonl, curves.png)")

    def _summary(self) -> str:
        ld, p = self.loaders, self.progress
        n_params = sum(t.numel() for t in self.model.parameters())
        at = f" (resuming epoch {p.epoch} at batch {p.batches_done})" if p.batches_done else ""
        return (f"model {self.cfg['model']} ({n_params / 1e6:.2f}M params) on {self.device.type} x{self.world}; "
                f"{len(ld['train_loader'].dataset)} train / {len(ld['val_loader'].dataset)} val images, "
                f"{ld['num_classes']} classes; batch {self.total_batch}, lr {self.lr:.3g}; "
                f"epochs {p.epoch}..{self.cfg['epochs'] - 1}{at}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.ddp_model = None  # before the process group goes (see teardown_distributed)


def train(cfg: dict[str, Any], resume_ckpt: dict[str, Any] | None = None, *, overwrite: bool = False,
          run_name: str | None = None) -> int:
    """Run the training described by the resolved config ``cfg`` (continuing ``resume_ckpt`` when
    given). ``cfg["output"]`` None: a new folder named after ``run_name`` (the preset) or the model.
    A folder that holds another run is refused unless ``overwrite``. Returns a process exit code."""
    rank, world, device = setup_distributed(cfg)
    cfg["amp"] = resolve_amp(cfg["amp"], device, cfg["amp_dtype"])  # None (auto): bf16 on a capable GPU
    trainer = None
    try:
        if cfg["output"] is None:
            cfg["output"] = rank0_value(new_run_folder(cfg, run_name))
        err, replace = None, False
        if rank == 0:
            try:
                replace = claim_output(cfg["output"], resume=cfg["resume"], overwrite=overwrite)
            except UserError as e:
                err = e
        if not all_ranks_agree(err is None, device):
            raise err or UserError(f"output folder '{cfg['output']}' already holds a run")
        trainer = Trainer(cfg, rank, world, device, resuming=resume_ckpt is not None)
        trainer.replace_run = replace
        trainer.restore(resume_ckpt)
        trainer.prepare_output()
        trainer.wrap_ddp()
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        teardown_distributed()


# --------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(path: str, overrides: dict[str, Any], use_ema: bool = False) -> dict[str, Any]:
    """Rebuild the model from a checkpoint alone and evaluate it on the val split of the data the
    overrides (or else the checkpoint's config) name. Returns the metrics of :func:`evaluate`."""
    from .config import DEFAULTS, validate_config

    ckpt = load_training_checkpoint(path)
    name = overrides.pop("model", None)
    extra_kwargs = overrides.pop("model_kwargs", None) or {}
    saved_name = ckpt.get("model_name")
    if saved_name is None and name is None:
        raise UserError(f"checkpoint '{path}' does not name its model; pass --model")
    if saved_name is not None and name is not None and name != saved_name:
        raise UserError(f"checkpoint '{path}' is for model '{saved_name}', not '{name}'")
    name = saved_name or name
    kwargs = {**(ckpt.get("model_kwargs") or {}), **extra_kwargs}
    cfg = {**DEFAULTS, **(ckpt.get("config") or {})}
    if "img_size" in kwargs:
        cfg["img_size"] = kwargs["img_size"]
    if overrides.get("data_dir") is not None and overrides.get("dataset") is None:
        cfg["dataset"] = None  # a data dir alone means the ImageFolder layout
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["val_subset"] = overrides.get("val_subset")
    if not (cfg["data_dir"] and data_layout(cfg["data_dir"]) == "flat"):
        cfg["holdout"] = None  # evaluate reads the val/ (test) split, never the run's held-out training images
    # a folder without train/ and val/ has only the run's held-out images to evaluate on: the same split again
    cfg["img_size"] = cfg["img_size"] or 224  # official weights carry no config
    cfg["batch_size"] = cfg["batch_size"] or 128
    cfg = validate_config(cfg)
    state = ckpt["model"]
    if use_ema:
        if ckpt.get("model_ema") is None:
            raise UserError(f"checkpoint '{path}' has no EMA weights (trained without --model-ema)")
        state = ckpt["model_ema"]
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    loaders = build_loaders(cfg, model_in_chans(kwargs), train=False)
    kwargs.setdefault("num_classes", loaders["num_classes"])
    if kwargs["num_classes"] != loaders["num_classes"]:
        raise UserError(f"checkpoint has {kwargs['num_classes']} classes but the data has {loaders['num_classes']}")
    kwargs.pop("pretrained", None)
    model = build_model(name, kwargs)
    load_weights(model, state, name, path)
    model.to(device)
    metrics = evaluate(model, loaders["val_loader"], device, cfg["amp"], cfg["amp_dtype"])
    data = cfg["dataset"] or cfg["data_dir"]
    split = f"{cfg['holdout']} held-out images of" if cfg["holdout"] else "the val split of"
    epoch = f", epoch {ckpt['epoch']}" if isinstance(ckpt.get("epoch"), int) else ""
    metrics["source"] = (f"{'EMA weights of ' if use_ema else ''}{os.path.abspath(path)} ({name}{epoch}) "
                         f"on {split} {data}")
    return metrics
