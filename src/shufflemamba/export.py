"""``shufflemamba export``: a training run as the folder timm users share and load (a segmentation
run: its own folder, :mod:`shufflemamba.segmentation.export`).

The folder is what timm's ``save_for_hf`` writes (``config.json``: architecture, num_classes, label
names, the model's arguments and its ``pretrained_cfg`` with input size, mean / std, crop_pct and
interpolation; ``model.safetensors``), plus what timm lacks: a model card generated from the run
(``README.md``: recipe, data, final and best metrics, SLWS setting) and the run's ``curves.png``.
timm loads it back by itself (after ``import shufflemamba`` registers the models)::

    timm.create_model("local-dir:OUTPUT_DIR", pretrained=True)     # or "hf-hub:USER/NAME" once pushed

(``pretrained=True`` is what reads the weights, as for any timm name; the ``local-dir:`` source needs a
recent timm 1.0 release, 1.0.31 here.)

Writing is all or nothing: the folder is built beside ``OUTPUT_DIR`` under a temporary name, loaded
back through timm and compared with the checkpoint, and only then renamed into place. ``--push-to-hub``
checks the Hub login before anything is written and uploads the finished folder in one commit.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import UserError
from .training.checkpointing import load_training_checkpoint  # the run-checkpoint reader (UserError on a bad file)

__all__ = ["export_run", "model_card", "read_run", "ExportSource"]

# keys of a registered pretrained_cfg that describe the architecture; the rest (Hub file, reported
# accuracy, licence of the released weights) describe other weights and are not carried over
ARCH_CFG_KEYS = ("architecture", "num_classes", "input_size", "pool_size", "crop_pct", "crop_mode", "interpolation",
                 "mean", "std", "first_conv", "classifier", "fixed_input_size", "paper_ids")
SLWS_PAPER = "https://arxiv.org/abs/2408.17081"
# constructor arguments that are run-time choices, not architecture (timm drops the drop rates itself)
RUNTIME_ARGS = ("drop_rate", "drop_path_rate", "scan_impl")


@dataclass
class ExportSource:
    """A training checkpoint and what the export needs from it."""

    path: str  # the checkpoint file
    run_dir: str  # the folder it lies in (curves.png is looked for there)
    ckpt: dict[str, Any]
    use_ema: bool

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.ckpt.get("config") or {})

    @property
    def history(self) -> list[dict[str, Any]]:
        return list((self.ckpt.get("progress") or {}).get("history") or [])


def read_run(source: str, use_ema: bool = False) -> ExportSource:
    """The checkpoint to export: ``source`` itself, or a run folder's ``best.pt``, else its ``last.pt`` (as
    :func:`shufflemamba.load_model` picks; pass ``RUN/last.pt`` for the final epoch). Raises UserError for a
    missing, foreign or corrupted file, or no EMA weights with ``use_ema``."""
    path = source
    if os.path.isdir(source):
        found = [p for p in (os.path.join(source, n) for n in ("best.pt", "last.pt")) if os.path.isfile(p)]
        if not found:
            raise UserError(f"'{source}' holds no best.pt or last.pt (no epoch finished there); pass a checkpoint file")
        path = found[0]
    elif not os.path.exists(source):
        raise UserError(f"'{source}' not found (expected a run folder or a checkpoint file)")
    ckpt = load_training_checkpoint(path)
    if not ckpt.get("model_name"):
        raise UserError(f"checkpoint '{path}' does not name its model (not written by `shufflemamba train`)")
    if use_ema and ckpt.get("model_ema") is None:
        raise UserError(f"checkpoint '{path}' has no EMA weights (trained without --model-ema)")
    return ExportSource(path=path, run_dir=os.path.dirname(os.path.abspath(path)), ckpt=ckpt, use_ema=use_ema)


def build_model(src: ExportSource) -> torch.nn.Module:
    """The checkpoint's model (its weights, or its EMA weights), in eval mode, built through timm."""
    import timm

    name = src.ckpt["model_name"]
    kwargs = {k: v for k, v in (src.ckpt.get("model_kwargs") or {}).items() if k != "pretrained"}
    if not timm.is_model(name):
        raise UserError(f"checkpoint '{src.path}' is for model '{name}', which timm does not know")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.load_state_dict(src.ckpt["model_ema" if src.use_ema else "model"], strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint '{src.path}' does not rebuild model '{name}': {first[:200]}") from None
    return model.eval()


def data_config(src: ExportSource, model: torch.nn.Module) -> dict[str, Any]:
    """The evaluation preprocessing of the run: input size, mean / std, crop_pct, interpolation."""
    from .training.data import norm_stats

    cfg = src.cfg
    in_chans = int(getattr(model, "in_chans", model.pretrained_cfg["input_size"][0]))
    size = list(model.pretrained_cfg["input_size"][1:])
    if cfg.get("img_size"):
        size = [int(cfg["img_size"])] * 2
    mean, std = norm_stats(cfg, in_chans)
    out: dict[str, Any] = {"input_size": (in_chans, *size), "mean": mean, "std": std, "crop_mode": "center"}
    for key in ("crop_pct", "interpolation"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def model_args(model: torch.nn.Module) -> dict[str, Any]:
    """All of our models' constructor arguments (``model_kwargs``), not only those the run passed, so the
    folder pins the architecture even if a registered name's defaults change; {} for other timm models."""
    return {k: v for k, v in (getattr(model, "model_kwargs", None) or {}).items() if k not in RUNTIME_ARGS}


def _clean_pretrained_cfg(model: torch.nn.Module, data: dict[str, Any], licence: str | None, description: str) -> None:
    """Keep only the architecture's part of the registered config (see ARCH_CFG_KEYS), with the run's
    preprocessing ``data``, and say what these weights are; a licence only when the user states one."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k in ARCH_CFG_KEYS}
    cfg.update(data, num_classes=model.num_classes)
    cfg["description"] = description
    if licence:
        cfg["license"] = licence
    model.pretrained_cfg = model.default_cfg = cfg


# --------------------------------------------------------------------------- the model card


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return "-" if v is None or v == "" else str(v)


def _metric_rows(row: dict[str, Any]) -> list[tuple[str, str]]:
    names = (("val_top1", "top-1 (%)"), ("val_top5", "top-5 (%)"), ("val_loss", "loss"), ("ema_top1", "EMA top-1 (%)"),
             ("train_loss", "train loss"))
    return [(label, f"{row[key]:.2f}" if "top" in key else f"{row[key]:.4f}") for key, label in names if key in row]


def model_card(src: ExportSource, model: torch.nn.Module, *, name: str, load_as: str, data: dict[str, Any],
               licence: str | None, has_curves: bool) -> str:
    """README.md for the export: front matter for the Hub, then what was trained on what, how, and how well."""
    cfg, hist, ckpt = src.cfg, src.history, src.ckpt
    kwargs = getattr(model, "model_kwargs", {}) or {}
    n_params = sum(p.numel() for p in model.parameters())
    dataset = cfg.get("dataset") or (f"image folder '{os.path.basename(os.path.normpath(cfg['data_dir']))}'"
                                     if cfg.get("data_dir") else "unknown")
    split = "held-out training images" if cfg.get("holdout") else "the val/ (test) split"
    classes = list(ckpt.get("classes") or [])
    lines = ["---", "tags:", "- image-classification", "- timm", "- vision-mamba", "- shufflemamba",
             "library_name: timm", "pipeline_tag: image-classification"]
    if licence:
        lines.append(f"license: {licence}")
    lines += ["---", f"# {name}", "",
              f"A `{ckpt['model_name']}` classifier trained with the `shufflemamba` package's `train` command on "
              f"{dataset} ({len(classes) or model.num_classes} classes), exported with `shufflemamba export`"
              + (" (EMA weights)." if src.use_ema else "."), ""]
    if not licence:
        lines += ["No licence was given at export: ask the author before reusing these weights.", ""]

    lines += ["## Model", "", "| | |", "|---|---|",
              f"| architecture | `{ckpt['model_name']}` |",
              f"| parameters | {n_params / 1e6:.3f}M |",
              *([f"| paper | {model.pretrained_cfg['paper_ids']} |"] if model.pretrained_cfg.get("paper_ids") else []),
              f"| input | {data['input_size'][0]} x {data['input_size'][1]} x {data['input_size'][2]}, "
              f"mean {_fmt(data['mean'])}, std {_fmt(data['std'])}, crop_pct {_fmt(data.get('crop_pct'))}, "
              f"{data.get('interpolation', 'bicubic')} |"]
    for key in ("embed_dim", "depth", "patch_size", "d_state", "cls_position", "num_registers"):
        if key in kwargs:
            lines.append(f"| {key} | {_fmt(kwargs[key])} |")
    if classes:
        shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
        lines.append(f"| classes | {shown} |")
    lines.append("")

    rate = kwargs.get("slws_rate")
    if rate is not None:
        slws = (f"p_max {_fmt(rate)}, {kwargs.get('slws_schedule', 'linear')} over depth" if rate else "off (p_max 0)")
        lines += ["## SLWS", "", f"Stochastic Layer-Wise Shuffle ({SLWS_PAPER}) during training: {slws}. It is a "
                  "training-only regulariser: inference never shuffles. Loading this folder keeps the setting for "
                  "further training; pass `slws_rate=0` to `timm.create_model` to fine-tune without it.", ""]

    recipe = (("epochs", "epochs"), ("batch_size", "batch per process"), ("lr", "lr"), ("scale_lr", "lr scaled by batch / 512"),
              ("opt", "optimizer"), ("opt_betas", "betas"), ("weight_decay", "weight decay"),
              ("warmup_epochs", "warmup epochs"), ("min_lr", "min lr"), ("clip_grad", "grad clip"),
              ("drop_path", "drop path"), ("smoothing", "label smoothing"), ("mixup", "mixup"), ("cutmix", "cutmix"),
              ("aa", "auto-augment"), ("reprob", "random erasing"), ("model_ema", "EMA"), ("model_ema_decay", "EMA decay"),
              ("amp", "autocast"), ("train_subset", "train subset"), ("holdout", "held out for validation"),
              ("seed", "seed"))
    rows = [f"| {label} | {_fmt(cfg[key])} |" for key, label in recipe if key in cfg and cfg[key] is not None]
    if rows:
        lines += ["## Training", "", f"Data: {dataset}; metrics below are on {split}.", "", "| setting | value |",
                  "|---|---|", *rows, ""]

    lines += ["## Results", ""]
    if hist:
        final = hist[-1]
        best = max(hist, key=lambda r: r.get("val_top1", -math.inf))
        total = cfg.get("epochs")
        # epochs counted from 1 here (metrics.jsonl counts from 0)
        lines += [f"These weights: after epoch {final['epoch'] + 1}" + (f" of {total}" if total else "")
                  + f", from `{os.path.basename(src.path)}`" + (", EMA" if src.use_ema else "") + ".", "",
                  f"| metric | final (epoch {final['epoch'] + 1}) | best top-1 (epoch {best['epoch'] + 1}) |",
                  "|---|---|---|"]
        best_rows = dict(_metric_rows(best))
        lines += [f"| {label} | {value} | {best_rows.get(label, '-')} |" for label, value in _metric_rows(final)]
        lines.append("")
    else:
        lines += ["The checkpoint records no evaluated epoch.", ""]
    if has_curves:
        lines += ["![loss and top-1 per epoch](curves.png)", ""]

    lines += ["## Usage", "", "```python", "import shufflemamba  # registers the Vision Mamba models in timm", "import timm",
              "", f'model = timm.create_model("{load_as}", pretrained=True).eval()',
              "config = timm.data.resolve_model_data_config(model)",
              "transform = timm.data.create_transform(**config, is_training=False)",
              "labels = model.pretrained_cfg.get(\"label_names\")", "```", "",
              f"Evaluate it on labelled data: `shufflemamba eval --checkpoint {load_as} --data-dir DIR` "
              "(DIR/val/CLASS/*.png) or `--dataset NAME`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing the folder


def _check_output(output: str, source_path: str, overwrite: bool) -> None:
    """Refuse an existing non-empty OUTPUT_DIR (unless it is an earlier export and ``overwrite``), a file
    there, and an OUTPUT_DIR that holds the checkpoint being exported."""
    out = os.path.abspath(output)
    if os.path.commonpath([out, os.path.abspath(source_path)]) == out:
        raise UserError(f"output folder '{output}' holds the checkpoint being exported; choose another folder")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UserError(f"output '{output}' exists and is not a folder")
    if os.listdir(out) and not overwrite:
        raise UserError(f"output folder '{output}' exists and is not empty; pass --overwrite to replace an earlier export")
    if os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise UserError(f"output folder '{output}' is not an earlier export (no config.json); --overwrite replaces only those")


def _hub_api(repo_id: str) -> Any:
    """An HfApi whose login works, checked before anything is written; UserError offline or logged out."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UserError(f"--push-to-hub wants a repo id like USER/NAME, got '{repo_id}'")
    api = HfApi()
    try:
        api.whoami()
    except Exception as err:  # noqa: BLE001 - no token, offline mode, no network, HTTP errors
        kind = type(err).__name__
        if kind == "LocalTokenNotFoundError":
            why = "not logged in: run `hf auth login` or set HF_TOKEN"
        elif kind == "OfflineModeIsEnabled":
            why = "HF_HUB_OFFLINE is set"
        else:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            why = f"{kind}: {first}; check the network and your login (`hf auth whoami`)"
        raise UserError(f"cannot publish to the Hugging Face Hub ({why}); nothing was written; "
                        "export without --push-to-hub to write the folder only") from None
    return api


def _verify(folder: str, model: torch.nn.Module) -> None:
    """Load the folder back the way users will (timm's local-dir source) and compare every tensor."""
    import timm

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    want, got = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in want if k not in got or not torch.equal(want[k], got[k])) + sorted(set(got) - set(want))
    if differ:
        raise RuntimeError(f"the exported folder does not load back into the same model (differs in {differ[:5]})")


def export_run(source: str, output: str, *, ema: bool = False, overwrite: bool = False,
               push_to_hub: str | None = None, licence: str | None = None) -> str:
    """Export a run folder or training checkpoint to ``output`` (see the module). Returns ``output``.

    Raises:
        UserError: bad source (missing, foreign, corrupted, no EMA weights), an output folder in the way,
            or, with ``push_to_hub``, no Hub login / network; nothing is written then.
    """
    from timm.models import save_for_hf

    src = read_run(source, use_ema=ema)
    _check_output(output, src.path, overwrite)
    api = _hub_api(push_to_hub) if push_to_hub else None
    if src.ckpt.get("task") == "segmentation":
        out = _export_segmentation(src, output, push_to_hub)
        if api is not None:
            _upload(api, push_to_hub, out)
        return out
    model = build_model(src)
    data = data_config(src, model)
    hist = src.history
    top1 = hist[-1].get("ema_top1" if ema else "val_top1") if hist else None
    what = f"top-1 {top1:.2f}% on its evaluation split" if isinstance(top1, float) else "no recorded evaluation"
    _clean_pretrained_cfg(model, data, licence, f"trained with shufflemamba ({what})")

    with _staged(output) as (out, tmp):
        labels = list(src.ckpt.get("classes") or [])
        save_for_hf(model, tmp, model_config={"label_names": labels} if labels else None, model_args=model_args(model),
                    safe_serialization=True)
        has_curves = _write_curves(src, os.path.join(tmp, "curves.png"))
        name = push_to_hub.split("/")[-1] if push_to_hub else os.path.basename(out)
        load_as = f"hf-hub:{push_to_hub}" if push_to_hub else f"local-dir:{out}"
        card = model_card(src, model, name=name, load_as=load_as, data=data, licence=licence, has_curves=has_curves)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        _verify(tmp, model)
    if api is not None:
        _upload(api, push_to_hub, out)
    return out


@contextlib.contextmanager
def _staged(output: str) -> Iterator[tuple[str, str]]:
    """(the absolute OUTPUT_DIR, a new temporary folder beside it) for the body to build the export in; then
    the folder is checked for what must not be published and renamed into place. Nothing of it is left on
    any failure; an OSError is one UserError naming OUTPUT_DIR."""
    out = os.path.abspath(output)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    except OSError as err:
        raise UserError(f"cannot write to '{parent}': {err.strerror or type(err).__name__}") from None
    try:
        yield out, tmp
        _publishable(tmp)
        _replace(tmp, out)
    except OSError as err:
        raise UserError(f"could not write the export to '{output}': {err.strerror or type(err).__name__}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_segmentation(src: ExportSource, output: str, push_to_hub: str | None) -> str:
    """A segmentation run's folder (:mod:`shufflemamba.segmentation.export`), built beside ``output``,
    read back and compared with the checkpoint, then renamed into place."""
    import json

    from safetensors.torch import save_file

    from .segmentation.export import CONFIG, WEIGHTS, export_config, load_seg_export, model_card

    with _staged(output) as (out, tmp):
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(export_config(src.ckpt), f, indent=2, default=str)
        state = {k: v.contiguous() for k, v in src.ckpt["model"].items()}
        save_file(state, os.path.join(tmp, WEIGHTS))
        run_png = os.path.join(src.run_dir, "curves.png")
        if os.path.isfile(run_png):
            shutil.copyfile(run_png, os.path.join(tmp, "curves.png"))
        name = push_to_hub.split("/")[-1] if push_to_hub else os.path.basename(out)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(src.ckpt, name, os.path.isfile(run_png)))
        back = load_seg_export(tmp)["model"]
        if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
            raise RuntimeError("the exported segmentation folder does not read back into the same weights")
    return out


def _write_curves(src: ExportSource, path: str) -> bool:
    """The run's curves.png, or one drawn from the checkpoint's history when the run folder has none."""
    run_png = os.path.join(src.run_dir, "curves.png")
    if os.path.isfile(run_png):
        shutil.copyfile(run_png, path)
        return True
    from .training.plots import plot_curves

    try:
        return plot_curves(src.history, path) is not None
    except ImportError:  # matplotlib is optional
        return False


def _publishable(folder: str) -> None:
    """The usual permissions (mkdtemp makes the folder private, safetensors its file)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _replace(tmp: str, out: str) -> None:
    """Rename the finished folder into place; an earlier export there is moved aside first, then removed."""
    old = None
    if os.path.exists(out):
        if not os.listdir(out):
            os.rmdir(out)
        else:
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=os.path.dirname(out))
            os.rmdir(old)
            os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _upload(api: Any, repo_id: str, folder: str) -> None:
    """The finished folder to the Hub in one commit (the repo is created if missing)."""
    try:
        repo = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Add model (shufflemamba export)")
    except Exception as err:  # noqa: BLE001 - network and HTTP errors of many kinds
        why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"exported to '{folder}', but the upload to {repo_id} failed ({type(err).__name__}: {why}); "
                        f"retry with `hf upload {repo_id} {folder}`") from None
    print(f"published to https://huggingface.co/{repo}")
