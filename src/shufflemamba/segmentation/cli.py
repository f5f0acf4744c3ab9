"""The segmentation side of ``shufflemamba train`` / ``eval``: its flags and the two commands.

``shufflemamba.cli`` adds :func:`add_segmentation_flags` to both subcommands and hands a run to
:func:`cmd_train_segmentation` / :func:`cmd_eval_segmentation` when :func:`wants_segmentation`
says so (``--task segmentation``, a segmentation preset, or a run folder whose config says so).
Importing this module imports nothing heavy (argparse only), so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from ..console import parse_bool
from ..errors import UserError

# flags only segmentation reads (dest names); classification refuses them when given
SEG_ONLY = ("task", "num_classes", "ignore_index", "reduce_zero_label", "layout", "crop_size", "iters", "val_interval",
            "warmup_iters", "test_mode", "test_stride", "aux_weight", "out_indices", "pretrained")
# classification flags that have a segmentation meaning under another name
RENAMED = {"img_size": "crop_size"}


def add_segmentation_flags(p: argparse.ArgumentParser, *, train: bool) -> None:
    g = p.add_argument_group("segmentation (--task segmentation)")
    g.add_argument("--task", choices=["classification", "segmentation"],
                   help="default: classification, or segmentation for a segmentation preset / run folder")
    g.add_argument("--num-classes", type=int, help="classes of the plain layout (default: classes.txt, ADE20K: 150)")
    g.add_argument("--ignore-index", type=int, help="mask value that is not scored (default 255)")
    g.add_argument("--reduce-zero-label", type=parse_bool, nargs="?", const=True,
                   help="label 0 is ignored and the others shift down by one (default: on for ADE20K's layout)")
    g.add_argument("--layout", choices=["auto", "ade20k", "plain"], help="folder layout (default: auto)")
    g.add_argument("--test-mode", choices=["slide", "whole"], help="inference: sliding windows (default) or whole image")
    g.add_argument("--test-stride", type=int, help="sliding-window stride in pixels (default 341)")
    if train:
        g.add_argument("--crop-size", type=int, help="training crop (default 512; --img-size means the same here)")
        g.add_argument("--iters", type=int, help="training iterations (default 160000)")
        g.add_argument("--val-interval", type=int, help="iterations between evaluations (default 8000)")
        g.add_argument("--warmup-iters", type=int, help="linear warmup iterations (default 1500)")
        g.add_argument("--aux-weight", type=float, help="auxiliary FCN head loss weight (default 0.4; 0: no aux head)")
        g.add_argument("--out-indices", type=int, nargs=4, metavar="I", help="the four backbone blocks tapped")
        g.add_argument("--pretrained", type=parse_bool, nargs="?", const=True, help="start the backbone from its released weights")


def wants_segmentation(args: argparse.Namespace) -> bool:
    if args.task is not None:
        return args.task == "segmentation"
    from .config import is_seg_preset

    if getattr(args, "config", None) and is_seg_preset(args.config):
        return True
    from .engine import is_seg_run

    return is_seg_run(getattr(args, "resume", None) or getattr(args, "checkpoint", None))


def refuse_segmentation_flags(args: argparse.Namespace) -> None:
    """Classification run: a segmentation-only flag is an error; drop them from ``args``."""

    for dest in SEG_ONLY:
        value = getattr(args, dest, None)
        if value is not None and dest != "task":
            raise UserError(f"--{dest.replace('_', '-')} needs --task segmentation")
        if hasattr(args, dest):
            delattr(args, dest)


def _seg_overrides(args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    from ..training.config import parse_kv_list

    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in skip or value is None or key == "task":
            continue
        key = RENAMED.get(key, key)
        if key == "model_kwargs":
            value = parse_kv_list(value)
        if key in out and out[key] != value:
            raise UserError("--img-size and --crop-size disagree; give one")
        out[key] = value
    return out


def cmd_train_segmentation(args: argparse.Namespace) -> int:
    import yaml

    from .config import SEG_DEFAULTS, apply_overrides, resolve_seg_config
    from ..training.checkpointing import claim_output, remove_run_files
    from ..training.defaults import new_run_folder
    from .engine import load_seg_checkpoint, train_segmentation

    overrides = _seg_overrides(args, {"command", "config", "print_config", "trust_checkpoint", "resume", "overwrite"})
    resume_ckpt = None
    if args.resume:
        resume_ckpt = load_seg_checkpoint(args.resume)
        if args.config:
            raise UserError("--resume continues a run with its own config; drop --config")
        cfg = {**SEG_DEFAULTS, **resume_ckpt["config"]}
        if overrides.get("model") not in (None, cfg["model"]):
            raise UserError(f"checkpoint '{args.resume}' is for model '{cfg['model']}', not '{overrides['model']}'")
        changed = sorted(k for k, v in overrides.items() if k not in ("iters", "output", "device", "workers",
                                                                       "log_interval", "checkpoint_every", "keep_last",
                                                                       "val_interval") and v != cfg.get(k))
        if changed:
            raise UserError(f"--resume keeps the run's recipe; these flags would change it: {', '.join(changed)}")
        overrides.setdefault("output", args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume) or ".")
        cfg = apply_overrides(cfg, overrides)
    else:
        cfg = resolve_seg_config(args.config, overrides)
        if overrides.get("output") is None:  # a new run never lands in another's folder
            cfg["output"] = new_run_folder({"model": cfg["model"]}, args.config)
    if args.print_config is not None:
        print(f"# resolved segmentation config{' of ' + args.config if args.config else ''}\n"
              + yaml.safe_dump(cfg, sort_keys=True), end="")
        return 0
    if resume_ckpt is None and claim_output(cfg["output"], resume=None, overwrite=args.overwrite):
        remove_run_files(cfg["output"])
    return train_segmentation(cfg, resume_ckpt)


def cmd_eval_segmentation(args: argparse.Namespace) -> int:
    from .engine import evaluate_seg_checkpoint

    if args.ema:
        raise UserError("--ema: segmentation runs keep no EMA weights")
    if args.img_size is not None:
        raise UserError("--img-size: a segmentation model keeps its training crop; see --test-mode / --test-stride")
    overrides = _seg_overrides(args, {"command", "checkpoint", "ema", "json", "trust_checkpoint", "model", "model_kwargs"})
    m = evaluate_seg_checkpoint(args.checkpoint, overrides)
    print(f"mIoU {m['mIoU']:.2f}  mAcc {m['mAcc']:.2f}  aAcc {m['aAcc']:.2f}  val_loss {m['val_loss']:.4f}  "
          f"{m['images']} images")
    if args.json:  # NaN (a class neither true nor predicted) as null: strict JSON
        clean = {k: m[k] for k in ("mIoU", "mAcc", "aAcc", "val_loss", "images", "IoU", "Acc", "classes")}
        for k in ("IoU", "Acc"):
            clean[k] = [None if math.isnan(v) else v for v in clean[k]]
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in clean.items()}))
    return 0
