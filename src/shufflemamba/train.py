"""Training and checkpoint evaluation: model building, checkpoints, resume, signals, DDP, metrics.

Checkpoints (``last.pt``, ``best.pt``) always reflect *finished* epochs: they are written at the end
of an epoch, atomically (tmp file + ``os.replace``). SIGTERM / Ctrl-C set a flag; the loop stops at
the next step, keeps the checkpoint of the last finished epoch, and exits with code 128 + signal
number. ``--resume`` reruns the interrupted epoch from its start, and truncates ``metrics.jsonl`` to
the epochs before it, so every epoch is recorded exactly once.
"""

from __future__ import annotations

import difflib
import gc
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import UserError, dump_config
from .data import build_loaders
from .engine import Interrupted, StepState, evaluate, train_one_epoch
from .plots import plot_curves, read_metrics

CHECKPOINT_VERSION = 1


def _register_models() -> None:
    """Import our model definitions so timm knows their names (absent while under development)."""
    try:
        import shufflemamba.models  # noqa: F401
    except ImportError:
        pass


def is_our_model(name: str) -> bool:
    """True when ``name`` is registered by shufflemamba (and so takes SLWS keyword arguments)."""
    from timm.models import _registry

    try:
        return _registry.model_entrypoint(name).__module__.startswith("shufflemamba")
    except (RuntimeError, KeyError):
        return False


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with user errors for unknown names and bad kwargs."""
    import timm

    _register_models()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise UserError(f"model '{name}' rejected its keyword arguments {sorted(kwargs)}: {err}") from None
    except (ValueError, AssertionError) as err:
        raise UserError(f"model '{name}' could not be built with {kwargs}: {err}") from None


def model_kwargs_for(cfg: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Keyword arguments for the model: the config's model_kwargs plus data-derived values, drop path
    and, for our Vim models, the SLWS rate and schedule."""
    kw = dict(cfg["model_kwargs"])
    kw.setdefault("num_classes", num_classes)
    kw.setdefault("img_size", cfg["img_size"])
    if cfg["drop_path"] is not None:
        kw.setdefault("drop_path_rate", cfg["drop_path"])
    ours = is_our_model(cfg["model"])
    for key in ("slws_rate", "slws_schedule"):
        if cfg[key] is None:
            continue  # the model's own default (ShuffleMamba models: 0.5, Vim models: 0)
        if not ours:
            raise UserError(f"--{key.replace('_', '-')} needs a ShuffleMamba/Vim model; '{cfg['model']}' does not support SLWS")
        kw.setdefault(key, cfg[key])
    return kw


def model_in_chans(kwargs: dict[str, Any]) -> int:
    return int(kwargs.get("in_chans", 3))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(obj: dict[str, Any], path: str) -> None:
    """``torch.save`` to a tmp file then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU. Raises UserError when missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle / zip errors of many kinds
        raise UserError(f"checkpoint '{path}' could not be read: {type(err).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint '{path}' holds no model state dict")
    return ckpt


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: str) -> None:
    """Strict load; a mismatch becomes one line naming the architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"checkpoint '{path}' does not match model '{name}': {first[:200]}") from None


def init_weights(model: nn.Module, path: str, name: str, log: Callable[[str], None] = print) -> None:
    """Start from another run's weights (later Reg stages, fine-tuning): pos_embed is resized to the
    new resolution; a head, registers or neck of another class count / register layout are left
    freshly initialised and named in one ``log`` line (``models.checkpoint.init_from_checkpoint``)."""
    ckpt = load_checkpoint(path)
    if is_our_model(name):
        from .models.checkpoint import init_from_checkpoint

        try:
            init_from_checkpoint(model, ckpt, key="model", log=log, source=path)
        except ValueError as err:
            raise UserError(f"--init-from '{path}' does not fit model '{name}': {err}") from None
    else:
        load_weights(model, ckpt["model"], name, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- distributed


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


class _SignalCatcher:
    """SIGTERM / SIGINT set ``state.stop_signal``; a second signal gets the default behaviour."""

    def __init__(self, state: StepState) -> None:
        self.state = state
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalCatcher":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.state.stop_signal = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- training


def _truncate_metrics(path: str, start_epoch: int) -> None:
    """Keep only epochs before ``start_epoch``: a resumed run rewrites the rest exactly once."""
    rows = [r for r in read_metrics(path) if r.get("epoch", -1) < start_epoch]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _tensorboard(output: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(os.path.join(output, "tb"))


def train(cfg: dict[str, Any], resume_ckpt: dict[str, Any] | None = None) -> int:
    """Run the training described by the resolved config ``cfg``. Returns a process exit code."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    rank, world, device = setup_distributed(cfg)
    main_proc = rank == 0

    def log(msg: str) -> None:
        if main_proc:
            print(msg, flush=True)

    try:
        seed_everything(cfg["seed"])  # same init on every rank (DDP also broadcasts rank 0's weights)
        loaders = build_loaders(cfg, model_in_chans(cfg["model_kwargs"]), rank, world, train=True)
        kwargs = model_kwargs_for(cfg, loaders["num_classes"])
        model = build_model(cfg["model"], kwargs).to(device)
        if cfg["init_from"] and resume_ckpt is None:
            init_weights(model, cfg["init_from"], cfg["model"], log=log)
        if resume_ckpt is not None:
            if resume_ckpt.get("model_name") != cfg["model"]:
                raise UserError(f"checkpoint '{cfg['resume']}' is for model '{resume_ckpt.get('model_name')}', not '{cfg['model']}'")
            load_weights(model, resume_ckpt["model"], cfg["model"], cfg["resume"])
        n_params = sum(p.numel() for p in model.parameters())
        total_batch = cfg["batch_size"] * world * cfg["accum_steps"]
        lr = cfg["lr"] * total_batch / 512 if cfg["scale_lr"] else cfg["lr"]
        from .optim import param_groups_weight_decay

        optimizer = create_optimizer_v2(  # groups carry their own decay (config key wd_grouping)
            param_groups_weight_decay(model, weight_decay=cfg["weight_decay"], grouping=cfg["wd_grouping"]),
            opt=cfg["opt"], lr=lr, betas=tuple(cfg["opt_betas"]), eps=cfg["opt_eps"],
        )
        updates_per_epoch = max(1, len(loaders["train_loader"]) // cfg["accum_steps"])
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg["sched"], num_epochs=max(cfg["epochs"], 1), warmup_epochs=cfg["warmup_epochs"],
            warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=not cfg["sched_on_updates"],
            updates_per_epoch=updates_per_epoch,
        )
        model_ema = ModelEmaV3(model, decay=cfg["model_ema_decay"], device=device) if cfg["model_ema"] else None
        use_scaler = cfg["amp"] and cfg["amp_dtype"] == "float16"
        scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        mixup_on = cfg["mixup"] > 0 or cfg["cutmix"] > 0
        mixup_fn = (
            Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"],
                  label_smoothing=cfg["smoothing"], num_classes=loaders["num_classes"])
            if mixup_on else None
        )
        if mixup_on:
            criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg["smoothing"] > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
        else:
            criterion = nn.CrossEntropyLoss()

        state = StepState(log=log)
        start_epoch, best_top1 = 0, -math.inf
        if resume_ckpt is not None:
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            scheduler.load_state_dict(resume_ckpt["scheduler"])
            if model_ema is not None and resume_ckpt.get("model_ema") is not None:
                model_ema.module.load_state_dict(resume_ckpt["model_ema"])
            if scaler is not None and resume_ckpt.get("scaler") is not None:
                scaler.load_state_dict(resume_ckpt["scaler"])
            start_epoch = int(resume_ckpt["epoch"]) + 1
            best_top1 = float(resume_ckpt.get("best_top1", -math.inf))
            state.num_updates = int(resume_ckpt.get("num_updates", start_epoch * updates_per_epoch))
            saved_rng = resume_ckpt["rng"]  # one state per rank; a different world size reuses rank 0's
            set_rng_state(saved_rng[rank] if rank < len(saved_rng) else saved_rng[0])
        else:
            seed_everything(cfg["seed"] + rank)  # different augmentation streams per rank

        ddp_model: nn.Module = model
        if world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        output = cfg["output"]
        metrics_path = os.path.join(output, "metrics.jsonl")
        curves_path = os.path.join(output, "curves.png")
        writer = None
        if main_proc:
            os.makedirs(output, exist_ok=True)
            dump_config(cfg, os.path.join(output, "config.yaml"))
            _truncate_metrics(metrics_path, start_epoch)
            writer = _tensorboard(output)
        log(
            f"model {cfg['model']} ({n_params / 1e6:.2f}M params) on {device.type} x{world}; "
            f"{len(loaders['train_loader'].dataset)} train / {len(loaders['val_loader'].dataset)} val images, "
            f"{loaders['num_classes']} classes; batch {total_batch}, lr {lr:.3g}; epochs {start_epoch}..{cfg['epochs'] - 1}"
        )
        progress = main_proc and sys.stdout.isatty()
        last = None
        with _SignalCatcher(state):
            try:
                for epoch in range(start_epoch, cfg["epochs"]):
                    t_epoch = time.perf_counter()
                    loaders["train_sampler"].set_epoch(epoch)
                    tr = train_one_epoch(
                        ddp_model, loaders["train_loader"], optimizer, criterion, epoch, cfg, device, state,
                        scheduler=scheduler, mixup_fn=mixup_fn, model_ema=model_ema, scaler=scaler, progress=progress,
                    )
                    scheduler.step(epoch + 1)  # per-epoch schedulers; a no-op when stepping on updates
                    ev = evaluate(model, loaders["val_loader"], device, cfg["amp"], cfg["amp_dtype"])
                    row = {
                        "epoch": epoch, "train_loss": tr["train_loss"], "val_loss": ev["loss"], "val_top1": ev["top1"],
                        "val_top5": ev["top5"], "lr": tr["lr"], "epoch_seconds": time.perf_counter() - t_epoch,
                        "images_per_second": tr["images"] / max(tr["seconds"], 1e-9),
                    }
                    if model_ema is not None:
                        row["ema_top1"] = evaluate(model_ema.module, loaders["val_loader"], device, cfg["amp"], cfg["amp_dtype"])["top1"]
                    if state.skipped_images:
                        row["skipped_images"] = state.skipped_images
                    last = row
                    if main_proc:
                        is_best = row["val_top1"] > best_top1
                        best_top1 = max(best_top1, row["val_top1"])
                        ckpt = {
                            "version": CHECKPOINT_VERSION, "model_name": cfg["model"], "model_kwargs": kwargs,
                            "model": model.state_dict(), "model_ema": model_ema.module.state_dict() if model_ema else None,
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "num_updates": state.num_updates,
                            "best_top1": best_top1, "config": cfg, "classes": loaders["classes"], "metrics": row,
                        }
                        ckpt["rng"] = _gather_rng(world)
                        save_checkpoint(ckpt, os.path.join(output, "last.pt"))
                        if is_best and cfg["save_best"]:
                            save_checkpoint(ckpt, os.path.join(output, "best.pt"))
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(row) + "\n")
                        plot_curves(read_metrics(metrics_path), curves_path)
                        if writer is not None:
                            for k, v in row.items():
                                if k != "epoch":
                                    writer.add_scalar(k, v, epoch)
                            writer.flush()
                    elif world > 1:
                        _gather_rng(world)
                    ema = f" ema_top1 {row['ema_top1']:.2f}" if "ema_top1" in row else ""
                    log(
                        f"epoch {epoch}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
                        f"val_top1 {row['val_top1']:.2f} val_top5 {row['val_top5']:.2f}{ema} lr {row['lr']:.3e} "
                        f"{row['epoch_seconds']:.1f}s {row['images_per_second']:.0f} img/s"
                    )
            except Interrupted as intr:
                name = signal.Signals(intr.signum).name
                last_pt = os.path.join(output, "last.pt")
                if last is None and resume_ckpt is None:
                    log(f"stopped by {name} before the first epoch finished; nothing saved")
                else:
                    done = last["epoch"] if last is not None else start_epoch - 1
                    log(f"stopped by {name}; {last_pt} holds epoch {done} (the partial epoch reruns); "
                        f"continue with: shufflemamba train --resume {last_pt}")
                return 128 + intr.signum
        if writer is not None:
            writer.close()
        if last is not None:
            log(f"final test top-1 {last['val_top1']:.2f}% (epoch {last['epoch']}); curves: {curves_path}; checkpoint: {os.path.join(output, 'last.pt')}")
        return 0
    finally:
        if dist.is_available() and dist.is_initialized():
            # Free the DDP wrapper first: its Reducer holds the process group, and if the Reducer
            # dropped the group's last reference (after destroy_process_group), the group's
            # destructor would join gloo's worker threads on this thread with the GIL held while a
            # worker waits for the GIL to free a finished all_gather's tensors: a deadlock we hit
            # in about 1 of 4 two-process CPU runs (pytorch/pytorch#56297 describes the pattern).
            ddp_model = None  # noqa: F841
            gc.collect()
            dist.destroy_process_group()


def _gather_rng(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (collective under DDP; rank 0 keeps the list)."""
    mine = rng_state()
    if world == 1:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(path: str, overrides: dict[str, Any], use_ema: bool = False) -> dict[str, Any]:
    """Rebuild the model from a checkpoint alone and evaluate it on the val split of the data the
    overrides (or else the checkpoint's config) name. Returns the metrics of :func:`evaluate`."""
    from .config import DEFAULTS, validate_config

    ckpt = load_checkpoint(path)
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
    return evaluate(model, loaders["val_loader"], device, cfg["amp"], cfg["amp_dtype"])
