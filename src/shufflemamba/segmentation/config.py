"""Segmentation run configuration: defaults, the shipped presets, YAML files and flag overrides.

Kept apart from the classification config (:mod:`shufflemamba.config`) because a segmentation run
counts iterations, not epochs, and has keys that classification has no use for (crop, sliding
window, heads, ignore index). Precedence, lowest to highest: ``SEG_DEFAULTS`` < preset / YAML file
(``--config``) < explicit flags. The resolved dict is written to ``OUTPUT/config.yaml`` and stored
in every checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import UserError
from ..training.config import list_yaml_presets, read_yaml_config

TASK = "segmentation"
PRESET_PACKAGE = "shufflemamba.segmentation"
LAYOUTS = ("auto", "ade20k", "plain")
TEST_MODES = ("slide", "whole")
ADE20K_CLASSES = 150

# Every key a segmentation config may hold. The values are the reference recipe's (ShuffleMamba's
# upernet_shufflemamba_8xb2-160k_ade20k-512x512_base.py) where it has one.
SEG_DEFAULTS: dict[str, Any] = {
    "task": TASK,
    # model: backbone taps -> strides 4 / 8 / 16 / 32 -> UperNet head (+ auxiliary FCN head)
    "model": "shufflemamba_base_patch16_224",
    "model_kwargs": {},
    "out_indices": [5, 11, 17, 23],  # the four blocks tapped
    "drop_path": 0.2,
    "slws_rate": 0.0,  # SLWS is off downstream (reference shuffle_rate 0)
    "pretrained": False,  # timm pretrained weights of the backbone (local files; see models/pretrained.py)
    "init_from": None,  # a classification checkpoint (or released weights) to start the backbone from
    "head_channels": 512,
    "pool_scales": [1, 2, 3, 6],
    "aux_channels": 256,
    "aux_weight": 0.4,  # 0 drops the auxiliary head
    "dropout": 0.1,
    # data
    "data_dir": None,
    "layout": "auto",  # ade20k: images/{training,validation} + annotations/...; plain: images/ + masks/
    "num_classes": None,  # None: 150 for ade20k, else from the plain layout's masks (max label + 1)
    "ignore_index": 255,
    "reduce_zero_label": None,  # None: true for ade20k (label 0 = "other" is ignored), false for plain
    "val_fraction": 0.1,  # plain layout without train/ and val/ subfolders: this share of stems validates
    "crop_size": 512,
    "scale": [2048, 512],  # resize target (long, short side bound), then x ratio_range at training
    "ratio_range": [0.5, 2.0],
    "cat_max_ratio": 0.75,  # re-draw a crop (up to 10 times) when one class covers more than this
    "hflip": 0.5,
    "photometric": True,  # brightness / contrast / saturation / hue jitter as mmseg's PhotoMetricDistortion
    "mean": [0.485, 0.456, 0.406],  # (123.675, 116.28, 103.53) / 255
    "std": [0.229, 0.224, 0.225],  # (58.395, 57.12, 57.375) / 255
    "val_subset": None,
    "workers": 2,
    # evaluation
    "test_mode": "slide",
    "test_crop": 512,
    "test_stride": 341,
    "val_interval": 8000,  # iterations between evaluations (and last.pt); the run's end always evaluates
    # optimisation: iterations, AdamW, linear warmup then poly decay
    "iters": 160000,
    "batch_size": 2,  # per process (8 GPUs x 2 images)
    "lr": 6e-5,  # absolute: not scaled by the batch
    "opt_betas": [0.9, 0.999],
    "weight_decay": 0.01,
    # a parameter whose name contains any of these gets no weight decay (mmengine custom_keys match
    # by substring: ".A_log" leaves "A_b_log" decayed, ".D" covers "D_b", "norm" every norm layer)
    "no_decay_keys": [".pos_embed", ".cls_token", "norm", ".A_log", ".D"],
    "warmup_iters": 1500,
    "warmup_ratio": 1e-6,  # the lr starts at this fraction of lr
    "poly_power": 1.0,
    "min_lr": 0.0,
    "clip_grad": None,
    "amp": None,  # None: bf16 autocast on a capable GPU, off on the CPU
    "amp_dtype": "bfloat16",
    "sync_bn": True,  # SyncBatchNorm in the heads under torchrun (the reference's SyncBN)
    # run
    "seed": 0,
    "device": None,
    "output": "runs/seg",
    "log_interval": 50,
    "checkpoint_every": 10.0,  # minutes between step checkpoints (0: only at evaluations and signals)
    "keep_last": 2,
    "save_best": True,
    "max_nonfinite": 5,
    "demo_figure": 4,  # validation images in OUTPUT/predictions.png after training (0: none)
}


def list_seg_presets() -> list[str]:
    return list_yaml_presets(PRESET_PACKAGE)


def is_seg_preset(name: str | None) -> bool:
    return bool(name) and (name[:-5] if name.endswith(".yaml") else name) in list_seg_presets()


def load_seg_config_file(name_or_path: str) -> dict[str, Any]:
    """A YAML file path or a shipped segmentation preset name, checked for unknown keys."""
    return read_yaml_config(name_or_path, SEG_DEFAULTS, package=PRESET_PACKAGE, task=TASK)


def resolve_seg_config(config: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults < ``config`` < overrides (None = not given). Keys unknown to segmentation are refused
    when set (a classification flag such as --mixup has no meaning here)."""
    cfg = copy.deepcopy(SEG_DEFAULTS)
    if config:
        cfg.update(load_seg_config_file(config))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in SEG_DEFAULTS:
            raise UserError(f"--{key.replace('_', '-')} does not apply to --task segmentation")
        cfg[key] = {**(cfg.get(key) or {}), **value} if key == "model_kwargs" else value
    return validate_seg_config(cfg)


def _int(cfg: dict[str, Any], key: str, lo: int, *, optional: bool = False) -> None:
    v = cfg[key]
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserError(f"{key} must be an integer >= {lo}, got {v!r}")


def _num(cfg: dict[str, Any], key: str, lo: float, hi: float = float("inf"), *, optional: bool = False) -> None:
    v = cfg[key]
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise UserError(f"{key} must be a number in [{lo}, {hi}], got {v!r}")


def _ints(cfg: dict[str, Any], key: str, n: int | None = None) -> None:
    v = cfg[key]
    if not (isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            and (n is None or len(v) == n)):
        raise UserError(f"{key} must be a list of {n or 'some'} integers, got {v!r}")
    cfg[key] = list(v)


def validate_seg_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check types and ranges (one :class:`UserError` naming the option). Returns ``cfg``."""
    cfg["task"] = TASK
    for key in ("crop_size", "test_crop", "test_stride", "iters", "batch_size", "head_channels", "aux_channels",
                "val_interval", "log_interval", "keep_last", "max_nonfinite"):
        _int(cfg, key, 1)
    for key in ("warmup_iters", "workers", "seed", "demo_figure"):
        _int(cfg, key, 0)
    _int(cfg, "num_classes", 1, optional=True)
    _int(cfg, "val_subset", 1, optional=True)
    _int(cfg, "ignore_index", 0)
    if cfg["num_classes"] is not None and cfg["ignore_index"] < cfg["num_classes"]:
        raise UserError(f"ignore_index {cfg['ignore_index']} is a class label (num_classes {cfg['num_classes']}); "
                        "pick a value >= num_classes, such as 255")
    _ints(cfg, "out_indices", 4)
    _ints(cfg, "pool_scales")
    _ints(cfg, "scale", 2)
    for key in ("drop_path", "slws_rate", "dropout", "hflip", "cat_max_ratio", "warmup_ratio", "val_fraction"):
        _num(cfg, key, 0.0, 1.0)
    if not 0.0 <= cfg["drop_path"] < 1.0:
        raise UserError(f"drop_path must be in [0, 1), got {cfg['drop_path']}")
    for key in ("aux_weight", "weight_decay", "min_lr", "checkpoint_every"):
        _num(cfg, key, 0.0)
    _num(cfg, "poly_power", 0.0)
    _num(cfg, "lr", 1e-12)
    _num(cfg, "clip_grad", 1e-12, optional=True)
    rr = cfg["ratio_range"]
    if not (isinstance(rr, (list, tuple)) and len(rr) == 2 and 0 < float(rr[0]) <= float(rr[1])):
        raise UserError(f"ratio_range must be two increasing positive numbers, got {rr!r}")
    cfg["ratio_range"] = [float(x) for x in rr]
    betas = cfg["opt_betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise UserError(f"opt_betas must be two numbers in [0, 1), got {betas!r}")
    cfg["opt_betas"] = [float(b) for b in betas]
    for key in ("mean", "std"):
        v = cfg[key]
        if not (isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(isinstance(x, (int, float)) for x in v)):
            raise UserError(f"{key} must be 1 or 3 numbers, got {v!r}")
    if cfg["layout"] not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, got {cfg['layout']!r}")
    if cfg["test_mode"] not in TEST_MODES:
        raise UserError(f"test_mode must be 'slide' or 'whole', got {cfg['test_mode']!r}")
    if cfg["test_stride"] > cfg["test_crop"]:
        raise UserError(f"test_stride {cfg['test_stride']} is larger than test_crop {cfg['test_crop']}: windows would leave gaps")
    for key in ("reduce_zero_label", "amp", "pretrained"):
        if cfg[key] is not None and not isinstance(cfg[key], bool):
            raise UserError(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg["amp_dtype"] not in ("bfloat16", "float16"):
        raise UserError(f"amp_dtype must be 'bfloat16' or 'float16', got {cfg['amp_dtype']!r}")
    if cfg["device"] not in (None, "cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {cfg['device']!r}")
    if not isinstance(cfg["model"], str) or not cfg["model"]:
        raise UserError("model must be a model name")
    if not isinstance(cfg["model_kwargs"], dict):
        raise UserError("model_kwargs must be a mapping of keyword: value")
    if not (isinstance(cfg["no_decay_keys"], list) and all(isinstance(k, str) for k in cfg["no_decay_keys"])):
        raise UserError("no_decay_keys must be a list of strings")
    return cfg
