"""The ``shufflemamba`` command: ``train``, ``eval``, ``predict``, ``export``, ``bench`` and ``doctor`` subcommands.

Mistakes in what the user asked for raise :class:`~shufflemamba.errors.UserError`; ``main`` prints
them as one ``error: ...`` line on stderr and returns 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from .console import guarded, parse_bool
from .errors import UserError
from .process import tune_malloc
from .segmentation.cli import add_segmentation_flags, refuse_segmentation_flags, wants_segmentation
from .training.config import format_config, list_presets, parse_kv_list, resolve_config

TRUST_HELP = "load checkpoints that need Python's unpickler (only for files you trust; default: weights_only)"


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
    g.add_argument("--data-dir", help="image folder: DIR/<class>/*.jpg (part held out to validate), or DIR/train/<class>/ "
                   "and DIR/val/<class>/; or the Fashion-MNIST IDX files")
    g.add_argument("--dataset", help="built-in dataset: fashion-mnist (Debian package dataset-fashion-mnist)")
    g.add_argument("--img-size", type=int)
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction")
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--workers", type=int, help="data loader worker processes")
    g.add_argument("--val-subset", type=int, help="evaluate on a fixed random subset of this many images")
    g.add_argument("--device", choices=["cpu", "cuda"])
    g.add_argument("--amp", type=parse_bool, nargs="?", const=True, help="autocast in --amp-dtype (true/false; default: auto, on for a bf16-capable GPU)")


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
    g.add_argument("--scale-lr", type=parse_bool, help="scale lr by total batch / 512")
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
    g.add_argument("--repeated-aug", type=parse_bool)
    g.add_argument("--model-ema", type=parse_bool, nargs="?", const=True)
    g.add_argument("--model-ema-decay", type=float)
    g = t.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--output", help="run folder; one that holds another run is refused")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --output (its checkpoints are deleted)")
    g.add_argument("--init-from", help="start from this checkpoint's weights (fine-tuning; pos_embed resized)")
    g.add_argument("--resume", help="run folder (its newest checkpoint) or checkpoint file to continue from; its config is the default")
    g.add_argument("--checkpoint-every", type=float, metavar="MINUTES",
                   help="mid-epoch step checkpoint every this many minutes (default 10; 0: only on signals and epoch ends)")
    g.add_argument("--keep-last", type=int, metavar="K", help="step checkpoints kept on disk (default 2)")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    g.add_argument("--log-interval", type=int)
    add_segmentation_flags(t, train=True)

    _show_defaults(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the val / test split")
    e.add_argument("--checkpoint", required=True,
                   help="run folder or checkpoint file; or an exported folder, local-dir:PATH or hf-hub:USER/NAME")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    e.add_argument("--model", help="only for checkpoints that do not name their model (official Vim weights)")
    e.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE")
    e.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    _add_data_flags(e)
    add_segmentation_flags(e, train=False)

    x = sub.add_parser("export", help="write a run's model as a timm / Hugging Face folder (config.json, model.safetensors, card)",
                       description='Load it back with timm.create_model("local-dir:OUTPUT_DIR", pretrained=True) after import shufflemamba.')
    x.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder (its best.pt, else last.pt) or checkpoint file (e.g. RUN/last.pt)")
    x.add_argument("output", metavar="OUTPUT_DIR", help="folder to create (refused if it exists and is not empty)")
    x.add_argument("--ema", action="store_true", help="export the EMA weights")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUTPUT_DIR")
    x.add_argument("--license", help="licence to state in the card and config (Hub id, e.g. apache-2.0; default: none stated)")
    x.add_argument("--push-to-hub", metavar="REPO_ID", help="also publish the folder to this Hugging Face Hub repo (needs a login)")
    x.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)

    from .predict import add_predict_parser

    add_predict_parser(sub, _Parser)
    sub.add_parser("bench", help="benchmark the selective scan and models (shufflemamba.bench.suite)", add_help=False)
    sub.add_parser("doctor", help="what this machine has; --gpu: the GPU check (shufflemamba.bench.gpu_check)",
                   add_help=False)
    return parser


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Each option's help ends with its default (DEFAULTS; "auto" where the data decides)."""
    from .training.config import AUTO_KEYS, DEFAULTS

    for action in p._actions:
        key = action.dest
        if key not in DEFAULTS or action.help == argparse.SUPPRESS:
            continue
        value = DEFAULTS[key]
        shown = f"auto: {AUTO_KEYS[key]}" if value is None and key in AUTO_KEYS else ("none" if value is None else value)
        if isinstance(shown, (list, tuple)):
            shown = " ".join(str(v) for v in shown)
        action.help = f"{action.help + '; ' if action.help else ''}default: {shown}"


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
        from .training.checkpointing import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


def cmd_train(args: argparse.Namespace) -> int:
    from .training.config import validate_config
    from .training.checkpointing import claim_output, load_training_checkpoint
    from .training.defaults import fill_auto_defaults
    from .training.trainer import train

    _trust(args)
    if wants_segmentation(args):
        from .segmentation.cli import cmd_train_segmentation

        return cmd_train_segmentation(args)
    refuse_segmentation_flags(args)
    overrides = _overrides(args, {"command", "config", "print_config", "trust_checkpoint", "overwrite"})
    resume_ckpt = None
    if args.resume:
        resume_ckpt = load_training_checkpoint(args.resume)
        if args.model is not None and resume_ckpt.get("model_name") not in (None, args.model):
            raise UserError(f"checkpoint '{args.resume}' is for model '{resume_ckpt.get('model_name')}', not '{args.model}'")
    if resume_ckpt is not None and not args.config and isinstance(resume_ckpt.get("config"), dict):
        # resume: the checkpoint's resolved config is the base; explicit flags (e.g. --epochs) override
        cfg = dict(resume_ckpt["config"])
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        if args.output is None:  # the run continues where its checkpoint is, whatever the working directory
            cfg["output"] = args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
        cfg = validate_config(cfg)
    else:
        cfg = resolve_config(args.config, overrides)
        init = load_training_checkpoint(cfg["init_from"]) if cfg["init_from"] else None
        notes = fill_auto_defaults(cfg, init_ckpt=init, init_source=cfg["init_from"])
        cfg = validate_config(cfg)
        if cfg["output"] and args.print_config is None:  # a folder in the way: its one line, before anything else
            claim_output(cfg["output"], resume=None, overwrite=args.overwrite)
        if notes and _is_rank0():
            lead = "# " if args.print_config is not None else ""  # keep --print-config's output valid YAML
            print(f"{lead}derived from the data (set any of these to override):\n"
                  + "\n".join(f"{lead}  {n}" for n in notes), flush=True)
    for key in ("data_dir", "output", "init_from", "resume"):  # config.yaml names files from anywhere
        if cfg.get(key):
            cfg[key] = os.path.abspath(cfg[key])
    if args.print_config is not None:
        print(format_config(cfg, world_size=_world_size(args.print_config), source=args.config or args.resume), end="")
        return 0
    return train(cfg, resume_ckpt, overwrite=args.overwrite, run_name=args.config)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _world_size(given: int) -> int:
    """``--print-config``'s process count: the flag's value, else torchrun's $WORLD_SIZE, else 1."""
    if given:
        return given
    env = os.environ.get("WORLD_SIZE", "1")
    if not env.isdigit() or int(env) < 1:
        raise UserError(f"WORLD_SIZE must be a positive integer, got {env!r}")
    return int(env)


def cmd_eval(args: argparse.Namespace) -> int:
    from .training.trainer import evaluate_checkpoint

    _trust(args)
    if wants_segmentation(args):
        from .segmentation.cli import cmd_eval_segmentation

        return cmd_eval_segmentation(args)
    refuse_segmentation_flags(args)
    overrides = _overrides(args, {"command", "checkpoint", "ema", "json", "trust_checkpoint"})
    from .hub import evaluate_exported, is_exported

    if is_exported(args.checkpoint):  # `shufflemamba export`'s folders, timm's local-dir: / hf-hub: names
        m = evaluate_exported(args.checkpoint, overrides, use_ema=args.ema)
    else:
        m = evaluate_checkpoint(args.checkpoint, overrides, use_ema=args.ema)
    print(f"evaluated {m['source']}")
    skipped = f" ({m['skipped']} unreadable skipped)" if m["skipped"] else ""
    print(
        f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
        f"{m['images']} images{skipped}  {m['images_per_second']:.0f} img/s"
    )
    if args.json:
        print(json.dumps({k: m[k] for k in ("top1", "top5", "loss", "images", "images_per_second", "skipped")}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    _trust(args)
    out = export_run(args.source, args.output, ema=args.ema, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
                     licence=args.license)
    print(f'exported to {out}; load it with timm.create_model("local-dir:{out}", pretrained=True) after import shufflemamba')
    return 0


def cmd_bench(argv: list[str]) -> int:
    try:
        suite = importlib.import_module("shufflemamba.bench.suite")
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("shufflemamba"):
            raise UserError("the benchmark module shufflemamba.bench.suite is not available in this install") from None
        raise
    return int(suite.main(argv) or 0)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "doctor":
        from .bench.gpu_check import main as doctor

        return doctor(argv[1:])
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "predict":
        from .predict import cmd_predict

        return cmd_predict(args)
    return cmd_eval(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shufflemamba`` console script. Returns the exit code.

    The command tunes its own process: malloc here, OpenMP's wait policy when the package loads
    (:mod:`shufflemamba.process`)."""
    tune_malloc()  # large tensors from the heap, kept between steps (fewer page faults)
    return guarded(_dispatch, list(sys.argv[1:] if argv is None else argv))
