"""Training configuration: defaults, shipped presets, YAML files and flag overrides.

Precedence, lowest to highest: ``DEFAULTS`` < preset / YAML file (``--config``) < explicit flags.
The resolved configuration is a plain ``dict`` (written to ``OUTPUT/config.yaml`` and stored in
every checkpoint), validated by :func:`validate_config`.
"""

from __future__ import annotations

import copy
import difflib
import os
from importlib import resources
from typing import Any

import yaml

from ..errors import UserError


# Every key a config may hold. Values are the defaults (a small-scale DeiT-style recipe); None on
# a key of AUTO_KEYS means "derive it from the data" (shufflemamba.defaults, printed at the start).
DEFAULTS: dict[str, Any] = {
    # model
    "model": None,  # auto: vim_tiny_patch16_224, or the --init-from checkpoint's model
    "model_kwargs": {},
    "drop_path": None,  # None: the model's default (as for the two SLWS options)
    "slws_rate": None,
    "slws_schedule": None,
    "init_from": None,  # checkpoint whose weights start the run (fine-tuning; pos_embed resized)
    # data
    "data_dir": None,
    "dataset": None,  # None: ImageFolder layout under data_dir; or "fashion-mnist"
    "img_size": None,  # auto: from the images (a patch size to match for our models), 28 for Fashion-MNIST
    "crop_pct": 0.875,
    "scale": [0.08, 1.0],  # RandomResizedCrop area range
    "ratio": [0.75, 1.3333333333333333],
    "hflip": 0.5,
    "interpolation": "bicubic",
    "mean": None,  # None: ImageNet mean/std (first channel only when in_chans == 1)
    "std": None,
    "train_subset": None,  # int: train on a fixed random subset of this many images
    "val_subset": None,
    # int: hold this many training images out as the validation set (curves, selection); the val/
    # (test) split is then left for final evaluation (`shufflemamba evaluate`) only
    "holdout": None,
    "workers": 2,
    # augmentation / regularisation
    "aa": None,  # e.g. "rand-m9-mstd0.5-inc1"
    "color_jitter": 0.0,
    "reprob": 0.0,
    "remode": "pixel",
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "smoothing": 0.1,
    "repeated_aug": False,  # RepeatAugSampler, used under DDP only (as in DeiT)
    # optimisation
    "epochs": 300,
    "batch_size": None,  # per process; auto: 128, halved until an epoch has at least 8 steps
    "accum_steps": 1,
    "opt": "adamw",
    "opt_betas": [0.9, 0.999],
    "opt_eps": 1e-8,
    "lr": None,  # auto: 5e-4 absolute up to total batch 512, scaled by total / 512 above
    "scale_lr": True,  # lr *= total batch / 512 (DeiT rule); false: lr is absolute
    "min_lr": 1e-5,
    "warmup_lr": 1e-6,
    "warmup_epochs": None,  # auto: 10% of the run, at most 5 epochs
    "sched": "cosine",
    "sched_on_updates": True,  # per-optimizer-step lr updates (smooth warmup on short runs)
    "weight_decay": 0.05,
    # which parameters skip weight decay (shufflemamba.training.optim): "reference" = timm 0.4.12 as both
    # reference trainers use it (A_log / A_b_log decayed; 1-D params, biases, tokens not);
    # "mamba" = also exempt A_log / A_b_log (the Mamba convention; this project's rule before issue 9)
    "wd_grouping": "reference",
    "clip_grad": None,
    "model_ema": False,
    "model_ema_decay": 0.9999,
    # autocast in amp_dtype (bf16; fp16 adds a GradScaler). None: auto, resolved by resolve_amp when
    # training starts: on for a CUDA device that supports bf16 (the official recipes train in bf16),
    # off on the CPU. true / false force it.
    "amp": None,
    "amp_dtype": "bfloat16",
    "max_nonfinite": 5,  # consecutive non-finite losses before the run stops
    # run
    "seed": 0,
    "device": None,  # None: cuda when available, else cpu
    "output": None,  # auto: a new folder runs/<preset or model>-<date>-<time>
    "resume": None,
    "log_interval": 50,
    "save_best": True,
    # step checkpoints (step_<updates>.pt) every this many minutes of training, and on SIGTERM /
    # SIGINT / SIGUSR1; a kill loses at most this much work. 0: only on signals and at epoch ends
    "checkpoint_every": 10.0,
    "keep_last": 2,  # step checkpoints kept on disk (older ones are deleted)
}

AUTO_KEYS = {  # what "auto" means for each (shufflemamba.defaults fills them; presets set them all)
    "model": "vim_tiny_patch16_224, or the --init-from checkpoint's",
    "img_size": "the images' median shorter side, at most 224 (28 for Fashion-MNIST)",
    "batch_size": "128, halved until an epoch has 8 steps",
    "lr": "5e-4, scaled by total batch / 512 above 512",
    "warmup_epochs": "10%% of the run, at most 5",
    "output": "a new folder runs/<preset or model>-<date>-<time>",
}

PRESET_DIR = "configs"
DATASET_NAMES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}


def list_yaml_presets(package: str = "shufflemamba") -> list[str]:
    """Names of the presets shipped in ``package``'s ``configs`` folder."""
    root = resources.files(package).joinpath(PRESET_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def list_presets() -> list[str]:
    """Names of the classification presets shipped in ``shufflemamba/configs``."""
    return list_yaml_presets()


def read_yaml_config(name_or_path: str, known: dict[str, Any], package: str = "shufflemamba",
                     task: str | None = None) -> dict[str, Any]:
    """A YAML file path or the name of a preset shipped in ``package``, as a mapping whose keys are all
    in ``known``; ``task`` ("segmentation") names the task in the messages.

    Raises:
        UserError: unknown preset, not YAML, not a mapping, or unknown keys.
    """
    kind = f"{task} " if task else ""
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            text = f.read()
        source = name_or_path
    else:
        name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
        presets = list_yaml_presets(package)
        if name not in presets:
            raise UserError(f"unknown {kind}preset or missing config file '{name_or_path}'; presets: {', '.join(presets)}")
        text = resources.files(package).joinpath(PRESET_DIR, name + ".yaml").read_text(encoding="utf-8")
        source = f"preset {name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config {source} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {source} must be a YAML mapping of option: value")
    unknown = sorted(set(data) - set(known))
    if unknown:
        hints = ", ".join(_with_hint(k, known) for k in unknown)
        raise UserError(f"config {source} has unknown {kind}option(s): {hints}")
    return data


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """A classification config: a YAML file path or a shipped preset name (see :func:`read_yaml_config`)."""
    return read_yaml_config(name_or_path, DEFAULTS)


def _with_hint(key: str, known: dict[str, Any] = DEFAULTS) -> str:
    """``key`` with a "did you mean" for the closest known option, if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"{key} (did you mean {close[0]}?)" if close else key


def parse_kv_list(items: list[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``3``, ``0.5``, ``true``, ``[1, 2]``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.isidentifier():
            raise UserError(f"malformed --model-kwargs entry '{item}': expected key=value")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"malformed --model-kwargs value in '{item}'") from None
    return out


def resolve_config(config: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults, the ``--config`` file or preset, and explicit overrides (None = not given)."""
    cfg = copy.deepcopy(DEFAULTS)
    if config:
        cfg.update(load_config_file(config))
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in DEFAULTS:
            raise UserError(f"unknown option {_with_hint(key)}")
        if key == "model_kwargs":
            cfg[key] = {**(cfg.get(key) or {}), **value}  # flag kwargs add to / override the preset's
        else:
            cfg[key] = value
    return validate_config(cfg)


def _check_range(cfg: dict[str, Any], key: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise UserError(f"{key} must be in {bracket}{lo}, {hi}], got {value}")


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check types and ranges; normalise a few values. Returns ``cfg``.

    Raises:
        UserError: with a message naming the offending option.
    """
    auto = {k for k in AUTO_KEYS if cfg.get(k) is None}  # left for shufflemamba.defaults to fill
    for key in ("epochs", "batch_size", "accum_steps", "img_size", "workers", "seed", "max_nonfinite", "log_interval"):
        if key in auto:
            continue
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            raise UserError(f"{key} must be an integer, got {cfg[key]!r}")
    for key in ("epochs", "batch_size", "accum_steps", "img_size", "max_nonfinite", "log_interval"):
        if key not in auto and cfg[key] < 1:
            raise UserError(f"{key} must be >= 1, got {cfg[key]}")
    # configs saved before step checkpoints existed (a checkpoint being resumed) get the defaults
    cfg.setdefault("checkpoint_every", DEFAULTS["checkpoint_every"])
    cfg.setdefault("keep_last", DEFAULTS["keep_last"])
    _check_range(cfg, "checkpoint_every", 0.0, float("inf"))
    if isinstance(cfg["keep_last"], bool) or not isinstance(cfg["keep_last"], int) or cfg["keep_last"] < 1:
        raise UserError(f"keep_last must be an integer >= 1, got {cfg['keep_last']!r}")
    if cfg["workers"] < 0:
        raise UserError(f"workers must be >= 0, got {cfg['workers']}")
    for key in ("slws_rate", "drop_path"):
        if cfg[key] is not None:
            _check_range(cfg, key, 0.0, 1.0)
    for key in ("reprob", "mixup_prob", "mixup_switch_prob", "hflip"):
        _check_range(cfg, key, 0.0, 1.0)
    _check_range(cfg, "smoothing", 0.0, 0.999)
    _check_range(cfg, "crop_pct", 0.0, 1.0, lo_open=True)
    _check_range(cfg, "model_ema_decay", 0.0, 1.0, lo_open=True)
    for key in ("mixup", "cutmix", "weight_decay", "min_lr", "warmup_lr", "warmup_epochs", "color_jitter"):
        if key not in auto:
            _check_range(cfg, key, 0.0, float("inf"))
    if "lr" not in auto:
        _check_range(cfg, "lr", 0.0, float("inf"), lo_open=True)
    if cfg["clip_grad"] is not None:
        _check_range(cfg, "clip_grad", 0.0, float("inf"), lo_open=True)
    if cfg["slws_schedule"] not in (None, "linear", "constant"):
        raise UserError(f"slws_schedule must be 'linear' or 'constant', got {cfg['slws_schedule']!r}")
    # a config saved before wd_grouping existed (a checkpoint being resumed) was trained with the
    # Mamba rule: keep it, so the run continues as it began and its optimizer state still fits
    cfg.setdefault("wd_grouping", "mamba")
    if cfg["wd_grouping"] not in ("reference", "mamba"):
        raise UserError(f"wd_grouping must be 'reference' or 'mamba', got {cfg['wd_grouping']!r}")
    if cfg["amp"] is not None and not isinstance(cfg["amp"], bool):
        raise UserError(f"amp must be true, false or null (auto), got {cfg['amp']!r}")
    if cfg["amp_dtype"] not in ("bfloat16", "float16"):
        raise UserError(f"amp_dtype must be 'bfloat16' or 'float16', got {cfg['amp_dtype']!r}")
    if not isinstance(cfg["model_kwargs"], dict):
        raise UserError("model_kwargs must be a mapping of keyword: value")
    if "model" not in auto and (not isinstance(cfg["model"], str) or not cfg["model"]):
        raise UserError("model must be a model name")
    betas = cfg["opt_betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise UserError(f"opt_betas must be two numbers in [0, 1), got {betas!r}")
    cfg["opt_betas"] = [float(b) for b in betas]
    for key in ("scale", "ratio"):
        v = cfg[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and 0 < float(v[0]) <= float(v[1])):
            raise UserError(f"{key} must be two increasing positive numbers, got {v!r}")
        cfg[key] = [float(x) for x in v]
    for key in ("train_subset", "val_subset", "holdout"):
        if cfg[key] is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["dataset"] is not None:
        name = str(cfg["dataset"]).lower()
        if name not in DATASET_NAMES:
            raise UserError(f"unknown dataset '{cfg['dataset']}'; known: fashion-mnist (or use --data-dir with train/ and val/)")
        cfg["dataset"] = DATASET_NAMES[name]
    return cfg


def effective_batch_lr(cfg: dict[str, Any], world_size: int) -> tuple[int, float]:
    """Total batch per optimiser step and the lr it trains at, for ``world_size`` processes.

    Total batch = ``batch_size`` x ``world_size`` x ``accum_steps``; with ``scale_lr`` the lr is
    ``lr`` x total / 512 (the DeiT rule the reference scripts use), else ``lr`` as given.
    """
    total = cfg["batch_size"] * world_size * cfg["accum_steps"]
    return total, cfg["lr"] * total / 512 if cfg["scale_lr"] else cfg["lr"]


def format_config(cfg: dict[str, Any], *, world_size: int, source: str | None = None) -> str:
    """The resolved config as YAML (sorted keys, as ``dump_config`` writes it), followed by a comment
    with the effective total batch and lr at ``world_size`` processes; the text loads back as ``cfg``."""
    total, lr = effective_batch_lr(cfg, world_size)
    how = f"{cfg['lr']:g} x {total} / 512" if cfg["scale_lr"] else "scale_lr false: lr as given"
    procs = f"{world_size} process{'es' if world_size != 1 else ''}"
    head = f"# resolved config{' of ' + source if source else ''}\n"
    tail = (f"# effective at {procs} x batch {cfg['batch_size'] * cfg['accum_steps']}: "
            f"total batch {total}, lr {lr:g} ({how})\n")
    return head + yaml.safe_dump(cfg, sort_keys=True) + tail


def resolve_amp(amp: bool | None, device: Any, amp_dtype: str = "bfloat16") -> bool:
    """The ``amp`` setting for a run on ``device``: an explicit true / false stands; None (auto) means
    autocast on a CUDA device that supports ``amp_dtype`` (bf16 needs compute capability 8.0+, as
    on A100 / H100; fp16 runs on any), off elsewhere (on the CPU, autocast would turn off the mixer's compiled channel-last path)."""
    if amp is not None:
        return bool(amp)
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return amp_dtype == "float16" or torch.cuda.is_bf16_supported()


def dump_config(cfg: dict[str, Any], path: str) -> None:
    """Write the resolved config as YAML (atomically: tmp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=True)
    os.replace(tmp, path)
