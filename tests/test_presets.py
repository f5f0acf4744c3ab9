"""The shipped presets against the reference training scripts, one row per setting.

References (read at huangzizheng01/ShuffleMamba 0df405f, whose run.sh / run_reg.sh equal the later
Supervised_training/ copies, and hustvl/Vim dd0358a):
- SM_RUN   = ShuffleMamba run.sh            (main_shuffle.py, timm 0.4.12)
- SM_MAIN  = ShuffleMamba main_shuffle.py   argparse defaults, for what run.sh does not set
- REG_RUN  = ShuffleMamba run_reg.sh        (three main_reg.py commands, one per stage)
- REG_MAIN = ShuffleMamba main_reg.py       argparse defaults (as main_shuffle.py's, but EMA on)
- VIM_RUN  = Vim vim/scripts/pt-vim-s.sh
- VIM_MAIN = Vim vim/main.py                argparse defaults
- TIMM     = timm 0.4.12 (the version both repositories pin): create_transform's defaults (scale
             (0.08, 1), ratio (3/4, 4/3), hflip 0.5) and create_optimizer's weight-decay grouping.
Our key <- their flag: img_size <- --input-size, crop_pct <- --eval-crop-ratio, slws_rate <- --ssr,
interpolation <- --train-interpolation, aa "3a" <- --ThreeAugment, init_from <- --finetune,
amp <- --amp bfloat16 (ShuffleMamba) / --no_amp (Vim), opt_betas None -> torch's (0.9, 0.999).
"""

from __future__ import annotations

import math
import re

import pytest

import shufflemamba  # noqa: F401
from shufflemamba.training.config import list_presets, resolve_config

SMB, VIMS = "shufflemamba_base_in1k", "vim_small_in1k"
REG1, REG2, REG3 = "reg_base_stage1", "reg_base_stage2", "reg_base_stage3"
REG = (REG1, REG2, REG3)
THIRDS = [0.75, 4.0 / 3.0]

# (preset, setting, reference value)
REFERENCE: list[tuple[str, str, object]] = [
    # --- ShuffleMamba-B: SM_RUN, else SM_MAIN -------------------------------------------------------
    (SMB, "model", "shufflemamba_base_patch16_224"),  # SM_RUN --model mambar_base_patch16_224 of models_shuffle.py
    (SMB, "batch_size", 256),  # SM_RUN --batch 256
    (SMB, "lr", 5e-4),  # SM_RUN --lr 5e-4
    (SMB, "scale_lr", True),  # SM_MAIN no --unscale-lr: lr * batch * accum_iter * world / 512
    (SMB, "accum_steps", 1),  # SM_MAIN --accum_iter 1
    (SMB, "weight_decay", 0.1),  # SM_RUN --weight-decay 0.1
    (SMB, "clip_grad", 3.0),  # SM_RUN --clip-grad 3.0
    (SMB, "opt_betas", [0.9, 0.95]),  # SM_RUN --opt-betas 0.9 0.95
    (SMB, "warmup_lr", 5e-7),  # SM_RUN --warmup-lr 5e-7
    (SMB, "min_lr", 5e-6),  # SM_RUN --min-lr 5e-6
    (SMB, "warmup_epochs", 30),  # SM_RUN --warmup-epochs 30
    (SMB, "epochs", 300),  # SM_RUN --epochs 300
    (SMB, "img_size", 224),  # SM_RUN --input-size 224
    (SMB, "drop_path", 0.5),  # SM_RUN --drop-path 0.5
    (SMB, "slws_rate", 0.5),  # SM_RUN --ssr 0.5
    (SMB, "slws_schedule", "linear"),  # models_shuffle.py: torch.linspace(0, shuffle_rate, depth)
    (SMB, "model_ema", True),  # SM_RUN --model-ema
    (SMB, "model_ema_decay", 0.9999),  # SM_RUN --model-ema-decay 0.9999
    (SMB, "workers", 12),  # SM_RUN --num_workers 12
    (SMB, "opt", "adamw"),  # SM_MAIN --opt adamw
    (SMB, "opt_eps", 1e-8),  # SM_MAIN --opt-eps 1e-8
    (SMB, "sched", "cosine"),  # SM_MAIN --sched cosine
    (SMB, "sched_on_updates", False),  # SM_MAIN lr_scheduler.step(epoch) once per epoch
    (SMB, "wd_grouping", "reference"),  # SM_MAIN create_optimizer(args, model): TIMM add_weight_decay
    (SMB, "aa", "rand-m9-mstd0.5-inc1"),  # SM_MAIN --aa default
    (SMB, "color_jitter", 0.3),  # SM_MAIN --color-jitter 0.3 (timm disables it under RandAugment)
    (SMB, "smoothing", 0.1),  # SM_MAIN --smoothing 0.1
    (SMB, "interpolation", "bicubic"),  # SM_MAIN --train-interpolation bicubic; eval Resize(interpolation=3)
    (SMB, "repeated_aug", True),  # SM_MAIN set_defaults(repeated_aug=True)
    (SMB, "reprob", 0.25),  # SM_MAIN --reprob 0.25
    (SMB, "remode", "pixel"),  # SM_MAIN --remode pixel
    (SMB, "mixup", 0.8),  # SM_MAIN --mixup 0.8
    (SMB, "cutmix", 1.0),  # SM_MAIN --cutmix 1.0
    (SMB, "mixup_prob", 1.0),  # SM_MAIN --mixup-prob 1.0
    (SMB, "mixup_switch_prob", 0.5),  # SM_MAIN --mixup-switch-prob 0.5
    (SMB, "crop_pct", 0.875),  # SM_MAIN --eval-crop-ratio 0.875
    (SMB, "amp", True),  # SM_MAIN --amp bfloat16 (default: autocast on)
    (SMB, "amp_dtype", "bfloat16"),  # SM_MAIN --amp bfloat16
    (SMB, "seed", 0),  # SM_MAIN --seed 0
    (SMB, "init_from", None),  # SM_RUN no --finetune
    (SMB, "scale", [0.08, 1.0]),  # TIMM
    (SMB, "ratio", THIRDS),  # TIMM
    (SMB, "hflip", 0.5),  # TIMM
    # --- Vim-S: VIM_RUN, else VIM_MAIN ---------------------------------------------------------------
    (VIMS, "model", "vim_small_patch16_224"),  # VIM_RUN --model vim_small_..._middle_cls_token_div2
    (VIMS, "batch_size", 64),  # VIM_RUN --batch-size 64
    (VIMS, "lr", 1e-3),  # VIM_RUN --lr 1e-3
    (VIMS, "scale_lr", True),  # VIM_MAIN no --unscale-lr: lr * batch * world / 512
    (VIMS, "accum_steps", 1),  # VIM_MAIN has no accumulation
    (VIMS, "drop_path", 0.05),  # VIM_RUN --drop-path 0.05
    (VIMS, "weight_decay", 0.05),  # VIM_RUN --weight-decay 0.05
    (VIMS, "amp", False),  # VIM_RUN --no_amp
    (VIMS, "workers", 25),  # VIM_RUN --num_workers 25
    (VIMS, "slws_rate", 0.0),  # Vim has no SLWS
    (VIMS, "epochs", 300),  # VIM_MAIN --epochs 300
    (VIMS, "img_size", 224),  # VIM_MAIN --input-size 224
    (VIMS, "opt", "adamw"),  # VIM_MAIN --opt adamw
    (VIMS, "opt_eps", 1e-8),  # VIM_MAIN --opt-eps 1e-8
    (VIMS, "opt_betas", [0.9, 0.999]),  # VIM_MAIN --opt-betas None: torch AdamW's
    (VIMS, "clip_grad", None),  # VIM_MAIN --clip-grad None
    (VIMS, "sched", "cosine"),  # VIM_MAIN --sched cosine
    (VIMS, "sched_on_updates", False),  # VIM_MAIN lr_scheduler.step(epoch) once per epoch
    (VIMS, "wd_grouping", "reference"),  # VIM_MAIN create_optimizer(args, model): TIMM add_weight_decay
    (VIMS, "warmup_lr", 1e-6),  # VIM_MAIN --warmup-lr 1e-6
    (VIMS, "min_lr", 1e-5),  # VIM_MAIN --min-lr 1e-5
    (VIMS, "warmup_epochs", 5),  # VIM_MAIN --warmup-epochs 5
    (VIMS, "model_ema", True),  # VIM_MAIN set_defaults(model_ema=True)
    (VIMS, "model_ema_decay", 0.99996),  # VIM_MAIN --model-ema-decay 0.99996
    (VIMS, "aa", "rand-m9-mstd0.5-inc1"),  # VIM_MAIN --aa default
    (VIMS, "color_jitter", 0.3),  # VIM_MAIN --color-jitter 0.3
    (VIMS, "smoothing", 0.1),  # VIM_MAIN --smoothing 0.1
    (VIMS, "interpolation", "bicubic"),  # VIM_MAIN --train-interpolation bicubic
    (VIMS, "repeated_aug", True),  # VIM_MAIN set_defaults(repeated_aug=True)
    (VIMS, "reprob", 0.25),  # VIM_MAIN --reprob 0.25
    (VIMS, "remode", "pixel"),  # VIM_MAIN --remode pixel
    (VIMS, "mixup", 0.8),  # VIM_MAIN --mixup 0.8
    (VIMS, "cutmix", 1.0),  # VIM_MAIN --cutmix 1.0
    (VIMS, "mixup_prob", 1.0),  # VIM_MAIN --mixup-prob 1.0
    (VIMS, "mixup_switch_prob", 0.5),  # VIM_MAIN --mixup-switch-prob 0.5
    (VIMS, "crop_pct", 0.875),  # VIM_MAIN --eval-crop-ratio 0.875
    (VIMS, "seed", 0),  # VIM_MAIN --seed 0
    (VIMS, "init_from", None),  # VIM_RUN no --finetune
    (VIMS, "scale", [0.08, 1.0]),  # TIMM
    (VIMS, "ratio", THIRDS),  # TIMM
    (VIMS, "hflip", 0.5),  # TIMM
    # --- Reg-B stages: REG_RUN's three commands --------------------------------------------------------
    *[(s, "model", "mambar_base_patch16_224") for s in REG],  # REG_RUN --model mambar_base_patch16_224
    (REG1, "batch_size", 128), (REG2, "batch_size", 128), (REG3, "batch_size", 64),  # REG_RUN --batch
    (REG1, "lr", 5e-4), (REG2, "lr", 2e-4), (REG3, "lr", 1e-5),  # REG_RUN --lr
    (REG1, "weight_decay", 0.05), (REG2, "weight_decay", 0.05), (REG3, "weight_decay", 0.1),  # REG_RUN
    (REG1, "reprob", 0.0), (REG2, "reprob", 0.0), (REG3, "reprob", 0.0),  # REG_RUN --reprob 0.0
    (REG1, "smoothing", 0.0), (REG2, "smoothing", 0.0), (REG3, "smoothing", 0.1),  # REG_RUN --smoothing
    (REG1, "repeated_aug", True), (REG2, "repeated_aug", True),  # REG_RUN --repeated-aug
    (REG3, "repeated_aug", False),  # REG_RUN --no-repeated-aug
    (REG1, "aa", "3a"), (REG2, "aa", "3a"),  # REG_RUN --ThreeAugment
    (REG3, "aa", "rand-m9-mstd0.5-inc1"),  # REG_RUN --aa rand-m9-mstd0.5-inc1
    (REG1, "crop_pct", 0.875), (REG2, "crop_pct", 0.875),  # REG_MAIN --eval-crop-ratio 0.875
    (REG3, "crop_pct", 1.0),  # REG_RUN --eval-crop-ratio 1.0
    (REG1, "epochs", 300), (REG2, "epochs", 100), (REG3, "epochs", 20),  # REG_RUN --epochs
    (REG1, "img_size", 128), (REG2, "img_size", 224), (REG3, "img_size", 224),  # REG_RUN --input-size
    (REG1, "drop_path", 0.1), (REG2, "drop_path", 0.4), (REG3, "drop_path", 0.4),  # REG_RUN --drop-path
    *[(s, "slws_rate", 0.1) for s in REG],  # REG_RUN --ssr 0.1
    (REG1, "init_from", None),  # REG_RUN stage 1: no --finetune
    (REG2, "init_from", "runs/reg_base_stage1/last.pt"),  # REG_RUN --finetune .../128pt/checkpoint.pth
    (REG3, "init_from", "runs/reg_base_stage2/last.pt"),  # REG_RUN --finetune .../224mid
    (REG1, "workers", 16), (REG2, "workers", 10), (REG3, "workers", 10),  # REG_RUN / REG_MAIN 10
    # --- Reg-B stages: what REG_RUN does not set, REG_MAIN's defaults -----------------------------------
    *[(s, "slws_schedule", "linear") for s in REG],  # models_reg.py: torch.linspace(0, shuffle_rate, depth)
    *[(s, "scale_lr", True) for s in REG],  # REG_MAIN no --unscale-lr
    *[(s, "accum_steps", 1) for s in REG],  # REG_MAIN --accum_iter 1
    *[(s, "opt", "adamw") for s in REG],  # REG_MAIN --opt adamw
    *[(s, "opt_eps", 1e-8) for s in REG],  # REG_MAIN --opt-eps 1e-8
    *[(s, "opt_betas", [0.9, 0.999]) for s in REG],  # REG_MAIN --opt-betas None: torch AdamW's
    *[(s, "clip_grad", None) for s in REG],  # REG_MAIN --clip-grad None
    *[(s, "sched", "cosine") for s in REG],  # REG_MAIN --sched cosine
    *[(s, "sched_on_updates", False) for s in REG],  # REG_MAIN lr_scheduler.step(epoch) per epoch
    *[(s, "wd_grouping", "reference") for s in REG],  # REG_MAIN create_optimizer: TIMM add_weight_decay
    *[(s, "warmup_epochs", 5) for s in REG],  # REG_MAIN --warmup-epochs 5
    *[(s, "warmup_lr", 1e-6) for s in REG],  # REG_MAIN --warmup-lr 1e-6
    *[(s, "min_lr", 1e-5) for s in REG],  # REG_MAIN --min-lr 1e-5
    *[(s, "model_ema", True) for s in REG],  # REG_MAIN set_defaults(model_ema=True)
    *[(s, "model_ema_decay", 0.99996) for s in REG],  # REG_MAIN --model-ema-decay 0.99996
    *[(s, "color_jitter", 0.3) for s in REG],  # REG_MAIN --color-jitter 0.3 (3-Augment's jitter)
    *[(s, "interpolation", "bicubic") for s in REG],  # REG_MAIN --train-interpolation bicubic
    *[(s, "remode", "pixel") for s in REG],  # REG_MAIN --remode pixel
    *[(s, "mixup", 0.8) for s in REG],  # REG_MAIN --mixup 0.8
    *[(s, "cutmix", 1.0) for s in REG],  # REG_MAIN --cutmix 1.0
    *[(s, "mixup_prob", 1.0) for s in REG],  # REG_MAIN --mixup-prob 1.0
    *[(s, "mixup_switch_prob", 0.5) for s in REG],  # REG_MAIN --mixup-switch-prob 0.5
    *[(s, "amp", True) for s in REG],  # REG_MAIN --amp bfloat16
    *[(s, "amp_dtype", "bfloat16") for s in REG],  # REG_MAIN --amp bfloat16
    *[(s, "seed", 0) for s in REG],  # REG_MAIN --seed 0
    *[(s, "scale", [0.08, 1.0]) for s in REG],  # TIMM; 3-Augment's crop uses the same (augment.py)
    *[(s, "ratio", THIRDS) for s in REG],  # TIMM
    *[(s, "hflip", 0.5) for s in REG],  # TIMM; 3-Augment: RandomHorizontalFlip()
]

# The launch each reference script makes: (processes, total batch, lr after the /512 scaling).
REFERENCE_RUNS = {
    SMB: (8, 2048, 2e-3),  # SM_RUN --nproc_per_node=8, --batch 256, 5e-4 * 2048 / 512
    VIMS: (8, 512, 1e-3),  # VIM_RUN --nproc_per_node=8, --batch-size 64, 1e-3 * 512 / 512
    REG1: (8, 1024, 1e-3),  # REG_RUN --nproc_per_node=8, --batch 128, 5e-4 * 1024 / 512
    REG2: (8, 1024, 4e-4),  # REG_RUN --nproc_per_node=8, --batch 128, 2e-4 * 1024 / 512
    REG3: (8, 512, 1e-5),  # REG_RUN --nproc_per_node=8, --batch 64, 1e-5 * 512 / 512
}
OWN_RECIPES = {"demo"}  # ours, no reference script: only the header check below applies

# Every setting that changes what a run trains; the table must hold each for each reference preset.
RECIPE_KEYS = {
    "model", "img_size", "crop_pct", "scale", "ratio", "hflip", "interpolation", "epochs", "batch_size",
    "accum_steps", "lr", "scale_lr", "opt", "opt_betas", "opt_eps", "weight_decay", "wd_grouping",
    "clip_grad", "sched", "sched_on_updates", "warmup_epochs", "warmup_lr", "min_lr", "drop_path",
    "slws_rate", "slws_schedule", "model_ema", "model_ema_decay", "aa", "color_jitter", "smoothing",
    "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "reprob", "remode", "repeated_aug", "amp",
    "amp_dtype", "init_from", "seed",
}
NOT_APPLICABLE = {VIMS: {"slws_schedule", "amp_dtype"}}  # no SLWS; fp32


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return not isinstance(a, bool) and not isinstance(b, bool) and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


@pytest.mark.parametrize("preset, key, value", REFERENCE, ids=[f"{p}-{k}" for p, k, _ in REFERENCE])
def test_preset_matches_reference(preset, key, value):
    cfg = resolve_config(preset, {})
    assert _same(cfg[key], value), f"{preset}: {key} is {cfg[key]!r}, the reference has {value!r}"


def test_table_covers_every_recipe_setting_once():
    seen: dict[str, list[str]] = {}
    for preset, key, _ in REFERENCE:
        assert key in RECIPE_KEYS | {"workers"}, key
        seen.setdefault(preset, []).append(key)
    assert set(seen) == set(REFERENCE_RUNS)
    for preset, keys in seen.items():
        assert len(keys) == len(set(keys)), f"{preset}: a setting appears twice"
        missing = RECIPE_KEYS - NOT_APPLICABLE.get(preset, set()) - set(keys)
        assert not missing, f"{preset}: no reference row for {sorted(missing)}"


def test_every_shipped_preset_is_held_here():
    assert set(list_presets()) == set(REFERENCE_RUNS) | OWN_RECIPES


def _header(preset: str) -> str:
    from importlib import resources

    text = resources.files("shufflemamba").joinpath("configs", preset + ".yaml").read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def _effective(cfg: dict, nproc: int) -> tuple[int, float]:
    total = cfg["batch_size"] * nproc * cfg["accum_steps"]
    return total, cfg["lr"] * total / 512 if cfg["scale_lr"] else cfg["lr"]


@pytest.mark.parametrize("preset", sorted(set(REFERENCE_RUNS) | OWN_RECIPES))
def test_header_states_run_line_and_effective_batch_and_lr(preset):
    header = _header(preset)
    runs = re.findall(r"^Run: (.*)$", header, flags=re.M)
    assert len(runs) == 1, f"{preset}: header needs exactly one 'Run:' line"
    run = runs[0]
    m = re.match(r"torchrun --nproc_per_node (\d+) -m shufflemamba train ", run)
    nproc = int(m.group(1)) if m else 1
    assert m or run.startswith("shufflemamba train "), run
    assert re.search(rf"--config {preset}(\s|$)", run), f"{preset}: Run line names another config: {run}"

    cfg = resolve_config(preset, {})
    total, lr = _effective(cfg, nproc)
    eff = re.search(r"Effective at (\d+) process(?:es)? x batch (\d+): total batch (\d+), lr (\d+(?:\.\d+)?e-?\d+)", header)
    assert eff, f"{preset}: header needs 'Effective at N processes x batch B: total batch T, lr L'"
    assert int(eff.group(1)) == nproc and int(eff.group(2)) == cfg["batch_size"] * cfg["accum_steps"]
    assert int(eff.group(3)) == total, f"{preset}: header says total batch {eff.group(3)}, the preset gives {total}"
    assert math.isclose(float(eff.group(4)), lr, rel_tol=1e-9), f"{preset}: header says lr {eff.group(4)}, the preset gives {lr:g}"
    # no other process / GPU count anywhere in the header
    for count in re.findall(r"(\d+) (?:GPUs?|processes|process)\b", header):
        assert int(count) == nproc, f"{preset}: header mentions {count} processes, the Run line {nproc}"


@pytest.mark.parametrize("preset", sorted(REFERENCE_RUNS))
def test_run_line_launches_the_reference_run(preset):
    nproc_ref, total_ref, lr_ref = REFERENCE_RUNS[preset]
    m = re.search(r"--nproc_per_node (\d+)", _header(preset))
    assert m and int(m.group(1)) == nproc_ref
    total, lr = _effective(resolve_config(preset, {}), nproc_ref)
    assert total == total_ref and math.isclose(lr, lr_ref, rel_tol=1e-9)
