"""The ``shufflemamba`` command: ``train``, ``eval``, ``predict``, ``bench`` and ``doctor`` subcommands.

Mistakes in what the user asked for raise :class:`~shufflemamba.config.UserError`; ``main`` prints
them as one ``error: ...`` line on stderr and returns 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import UserError, format_config, list_presets, parse_kv_list, resolve_config
from .console import guarded
from .segmentation.cli import add_segmentation_flags, refuse_segmentation_flags, wants_segmentation

TRUST_HELP = "load checkpoints that need Python's unpickler (only for files you trust; default: weights_only)"


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, our exit code) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="ImageFolder root with train/ and val/ (or the Fashion-MNIST IDX files)")
    g.add_argument("--dataset", help="built-in dataset: fashion-mnist (Debian package dataset-fashion-mnist)")
    g.add_argument("--img-size", type=int)
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction")
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--workers", type=int, help="data loader worker processes")
    g.add_argument("--val-subset", type=int, help="evaluate on a fixed random subset of this many images")
    g.add_argument("--device", choices=["cpu", "cuda"])
    g.add_argument("--amp", type=_bool, nargs="?", const=True, help="autocast in --amp-dtype (true/false; default: auto, on for a bf16-capable GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shufflemamba", description="Train and evaluate Vision Mamba models with Stochastic Layer-Wise Shuffle.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    from .segmentation.config import list_seg_presets

    t = sub.add_parser("train", help="train a model",
                       description=f"Presets: {', '.join(list_presets())}; segmentation: {', '.join(list_seg_presets())}")
    t.add_argument("--config", help="YAML file or preset name; explicit flags override it")
    t.add_argument("--model")
    t.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", help="extra model keyword arguments")
    t.add_argument(
        "--print-config", nargs="?", const=0, type=_positive_int, metavar="WORLD_SIZE",
        help="print the resolved config as YAML, with the effective total batch and lr at WORLD_SIZE "
        "processes (default: $WORLD_SIZE, else 1), and exit without building data or model",
    )
    _add_data_flags(t)
    t.add_argument("--train-subset", type=int, help="train on a fixed random subset of this many images")
    t.add_argument(
        "--holdout", type=int,
        help="validate on this many training images held out of training (the val/ split is left for `evaluate`)",
    )
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float, help="base lr at total batch 512 (scaled), or absolute with --scale-lr false")
    g.add_argument("--scale-lr", type=_bool, help="scale lr by total batch / 512")
    g.add_argument("--min-lr", type=float)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--opt-betas", type=float, nargs=2)
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--accum-steps", type=int, help="gradient accumulation micro-batches per step")
    g.add_argument("--amp-dtype", choices=["bfloat16", "float16"])
    g = t.add_argument_group("regularisation")
    g.add_argument("--drop-path", type=float)
    g.add_argument("--slws-rate", "--ssr", dest="slws_rate", type=float, help="SLWS max shuffle probability p_max in [0, 1]")
    g.add_argument("--slws-schedule", choices=["linear", "constant"])
    g.add_argument("--mixup", type=float)
    g.add_argument("--cutmix", type=float)
    g.add_argument("--smoothing", type=float)
    g.add_argument("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('none' to disable)")
    g.add_argument("--color-jitter", type=float)
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--repeated-aug", type=_bool)
    g.add_argument("--model-ema", type=_bool, nargs="?", const=True)
    g.add_argument("--model-ema-decay", type=float)
    g = t.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--output")
    g.add_argument("--init-from", help="start from this checkpoint's weights (fine-tuning; pos_embed resized)")
    g.add_argument("--resume", help="run folder (its newest checkpoint) or checkpoint file to continue from; its config is the default")
    g.add_argument("--checkpoint-every", type=float, metavar="MINUTES",
                   help="mid-epoch step checkpoint every this many minutes (default 10; 0: only on signals and epoch ends)")
    g.add_argument("--keep-last", type=int, metavar="K", help="step checkpoints kept on disk (default 2)")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    g.add_argument("--log-interval", type=int)
    add_segmentation_flags(t, train=True)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the val / test split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    e.add_argument("--model", help="only for checkpoints that do not name their model (official Vim weights)")
    e.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE")
    e.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    _add_data_flags(e)
    add_segmentation_flags(e, train=False)

    from .predict import add_predict_parser

    add_predict_parser(sub, _Parser)
    sub.add_parser("bench", help="benchmark the selective scan and models (shufflemamba.bench)", add_help=False)
    sub.add_parser("doctor", help="what this machine has; --gpu: the GPU check (shufflemamba.gpu_check)",
                   add_help=False)
    return parser


def _overrides(args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    out = {k: v for k, v in vars(args).items() if k not in skip}
    if out.get("model_kwargs") is not None:
        out["model_kwargs"] = parse_kv_list(out["model_kwargs"])
    if out.get("aa") is not None and str(out["aa"]).lower() == "none":
        out["aa"] = ""
    return out


def _trust(args: argparse.Namespace) -> None:
    """--trust-checkpoint: the full unpickler for every checkpoint this process reads."""
    if args.trust_checkpoint:
        from .checkpointing import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


def cmd_train(args: argparse.Namespace) -> int:
    from .config import validate_config
    from .train import load_checkpoint, train

    _trust(args)
    if wants_segmentation(args):
        from .segmentation.cli import cmd_train_segmentation

        return cmd_train_segmentation(args)
    refuse_segmentation_flags(args)
    overrides = _overrides(args, {"command", "config", "print_config", "trust_checkpoint"})
    resume_ckpt = None
    if args.resume:
        resume_ckpt = load_checkpoint(args.resume)
        if args.model is not None and resume_ckpt.get("model_name") not in (None, args.model):
            raise UserError(f"checkpoint '{args.resume}' is for model '{resume_ckpt.get('model_name')}', not '{args.model}'")
    if resume_ckpt is not None and not args.config and isinstance(resume_ckpt.get("config"), dict):
        # resume: the checkpoint's resolved config is the base; explicit flags (e.g. --epochs) override
        cfg = dict(resume_ckpt["config"])
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        cfg = validate_config(cfg)
    else:
        cfg = resolve_config(args.config, overrides)
    if args.print_config is not None:
        print(format_config(cfg, world_size=_world_size(args.print_config), source=args.config or args.resume), end="")
        return 0
    return train(cfg, resume_ckpt)


def _world_size(given: int) -> int:
    """``--print-config``'s process count: the flag's value, else torchrun's $WORLD_SIZE, else 1."""
    if given:
        return given
    env = os.environ.get("WORLD_SIZE", "1")
    if not env.isdigit() or int(env) < 1:
        raise UserError(f"WORLD_SIZE must be a positive integer, got {env!r}")
    return int(env)


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    _trust(args)
    if wants_segmentation(args):
        from .segmentation.cli import cmd_eval_segmentation

        return cmd_eval_segmentation(args)
    refuse_segmentation_flags(args)
    overrides = _overrides(args, {"command", "checkpoint", "ema", "json", "trust_checkpoint"})
    m = evaluate_checkpoint(args.checkpoint, overrides, use_ema=args.ema)
    skipped = f" ({m['skipped']} unreadable skipped)" if m["skipped"] else ""
    print(
        f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
        f"{m['images']} images{skipped}  {m['images_per_second']:.0f} img/s"
    )
    if args.json:
        print(json.dumps({k: m[k] for k in ("top1", "top5", "loss", "images", "images_per_second", "skipped")}))
    return 0


def cmd_bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("shufflemamba"):
            raise UserError("the benchmark module shufflemamba.bench is not available in this install") from None
        raise
    return int(bench.main(argv) or 0)


def _dispatch(argv: list[str]) -> int:
    import shufflemamba  # noqa: F401  (torchvision shim before timm)
    from ._malloc import tune_malloc

    tune_malloc()  # large tensors from the heap, kept between steps (fewer page faults; _malloc.py)

    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "doctor":
        from .gpu_check import main as doctor

        return doctor(argv[1:])
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "predict":
        from .predict import cmd_predict

        return cmd_predict(args)
    return cmd_eval(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shufflemamba`` console script. Returns the exit code."""
    return guarded(_dispatch, list(sys.argv[1:] if argv is None else argv))
