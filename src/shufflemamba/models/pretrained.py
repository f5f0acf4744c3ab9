"""Pretrained configs (timm ``default_cfgs``) for the weights the authors released, and their loading.

Released weights, all ImageNet-1k classifiers at 224 px; top-1 / top-5 as the authors report them:

================================== ======================================= ============================== ===== =====
model.tag                          Hugging Face Hub repo                   file                           top-1 top-5
================================== ======================================= ============================== ===== =====
vim_tiny_patch16_224.in1k          hustvl/Vim-tiny-midclstok               vim_t_midclstok_76p1acc.pth    76.1  93.0
vim_tiny_patch16_stride8_224.in1k  hustvl/Vim-tiny-midclstok               vim_t_midclstok_ft_78p3acc.pth 78.3  94.2
vim_small_patch16_224.in1k         hustvl/Vim-small-midclstok              vim_s_midclstok_80p5acc.pth    80.5  95.1
vim_small_patch16_stride8_224.in1k hustvl/Vim-small-midclstok              vim_s_midclstok_ft_81p6acc.pth 81.6  95.4
vim_base_patch16_224.in1k          hustvl/Vim-base-midclstok               vim_b_midclstok_81p9acc.pth    81.9  95.8
mambar_small_patch16_224.in1k      Wangf3014/Mamba-Reg                     mambar_small_patch16_224.pth   81.4
mambar_base_patch16_224.in1k       Wangf3014/Mamba-Reg                     mambar_base_patch16_224.pth    83.0
mambar_large_patch16_224.in1k      Wangf3014/Mamba-Reg                     mambar_large_patch16_224.pth   83.6
================================== ======================================= ============================== ===== =====

Vim's "+" weights are a 30-epoch fine-tune of the base weights with patch stride 8 (27 x 27 overlapping
patches, 730 tokens). A stride changes the architecture (the position embedding has 730 rows, not
197), so as timm does for such changes they are separate registered names,
``vim_{tiny,small}_patch16_stride8_224``, built with ``stride=8`` (no Vim-B "+" was released). The
Mamba-Reg numbers are the README's (slightly above the paper's, from an improved recipe), evaluated
with crop 1.0, which the configs record as ``crop_pct``. Mamba-Reg released no tiny weights, and
ShuffleMamba has released none (its README lists "release the trained models" as to do), so the
``shufflemamba_*`` and ``mambar_tiny`` configs have no weights: ``pretrained=True`` on them needs
``pretrained_cfg_overlay=dict(file=...)``.

Loading (``pretrained=True``): :func:`resolve_weights` turns a Hub id into a local file first (so a
failed download is one clear error, not a traceback from deep inside timm), then timm hands that file to
``VisionMamba.load_pretrained`` (the configs set timm's ``custom_load``), which calls
:func:`load_pretrained`. The released files are whole training checkpoints (``model``, ``model_ema``,
optimizer state, the argparse arguments): we take ``model``, which the authors' evaluation command loads
(timm's generic file loader would prefer ``model_ema``), read them with ``weights_only=True`` plus
``argparse.Namespace`` (:func:`~shufflemamba.models.checkpoint.read_checkpoint`), resize pos_embed to the
model's grid, and with another class count or register layout drop what does not fit, in one log line
(:func:`~shufflemamba.models.checkpoint.init_from_checkpoint`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, resolve_pretrained_cfg
from torch import nn

from .checkpoint import init_from_checkpoint

__all__ = ["ReleasedWeights", "RELEASED_WEIGHTS", "default_cfgs", "released", "resolve_weights", "load_pretrained"]

VIM_README = "https://github.com/hustvl/Vim#model-weights"
MAMBA_REG_README = "https://github.com/wangf3014/Mamba-Reg#models"


@dataclass(frozen=True)
class ReleasedWeights:
    """One released weight file and what its authors report for it.

    Attributes:
        model: the registered model name it loads into.
        tag: timm's pretrained tag (``timm.create_model(f"{model}.{tag}", pretrained=True)``).
        hf_hub_id: Hugging Face Hub repository.
        hf_hub_filename: file in that repository.
        top1: ImageNet-1k top-1 (%) reported by the authors.
        top5: ImageNet-1k top-5 (%), where reported.
        reported_in: where the file and the numbers are listed.
        crop_pct: the centre-crop fraction of the authors' evaluation.
    """

    model: str
    tag: str
    hf_hub_id: str
    hf_hub_filename: str
    top1: float
    top5: float | None
    reported_in: str
    crop_pct: float = 0.875


RELEASED_WEIGHTS: tuple[ReleasedWeights, ...] = (
    ReleasedWeights("vim_tiny_patch16_224", "in1k", "hustvl/Vim-tiny-midclstok",
                    "vim_t_midclstok_76p1acc.pth", 76.1, 93.0, VIM_README),
    ReleasedWeights("vim_tiny_patch16_stride8_224", "in1k", "hustvl/Vim-tiny-midclstok",
                    "vim_t_midclstok_ft_78p3acc.pth", 78.3, 94.2, VIM_README),
    ReleasedWeights("vim_small_patch16_224", "in1k", "hustvl/Vim-small-midclstok",
                    "vim_s_midclstok_80p5acc.pth", 80.5, 95.1, VIM_README),
    ReleasedWeights("vim_small_patch16_stride8_224", "in1k", "hustvl/Vim-small-midclstok",
                    "vim_s_midclstok_ft_81p6acc.pth", 81.6, 95.4, VIM_README),
    ReleasedWeights("vim_base_patch16_224", "in1k", "hustvl/Vim-base-midclstok",
                    "vim_b_midclstok_81p9acc.pth", 81.9, 95.8, VIM_README),
    ReleasedWeights("mambar_small_patch16_224", "in1k", "Wangf3014/Mamba-Reg",
                    "mambar_small_patch16_224.pth", 81.4, None, MAMBA_REG_README, crop_pct=1.0),
    ReleasedWeights("mambar_base_patch16_224", "in1k", "Wangf3014/Mamba-Reg",
                    "mambar_base_patch16_224.pth", 83.0, None, MAMBA_REG_README, crop_pct=1.0),
    ReleasedWeights("mambar_large_patch16_224", "in1k", "Wangf3014/Mamba-Reg",
                    "mambar_large_patch16_224.pth", 83.6, None, MAMBA_REG_README, crop_pct=1.0),
)

# registered names without released weights (a config all the same: input size, mean / std, head name)
_NO_WEIGHTS = ("shufflemamba_middle_patch16_224", "shufflemamba_base_patch16_224",
               "shufflemamba_large_patch16_224", "mambar_tiny_patch16_224")

_PAPERS = {"vim": ("arXiv:2401.09417", "https://github.com/hustvl/Vim"),
           "mambar": ("arXiv:2405.14858", "https://github.com/wangf3014/Mamba-Reg"),
           "shufflemamba": ("arXiv:2408.17081", "https://github.com/huangzizheng01/ShuffleMamba")}


def _cfg(model: str, **kwargs: Any) -> dict[str, Any]:
    paper_ids, origin_url = _PAPERS[model.split("_")[0]]
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": paper_ids, "origin_url": origin_url,
        # every file goes through VisionMamba.load_pretrained ("hf": for Hub ids too), see the module doc
        "custom_load": "hf", **kwargs,
    }


def _released_cfg(w: ReleasedWeights) -> dict[str, Any]:
    top5 = f", top-5 {w.top5}" if w.top5 is not None else ""
    return _cfg(w.model, hf_hub_id=w.hf_hub_id, hf_hub_filename=w.hf_hub_filename, crop_pct=w.crop_pct,
                description=f"ImageNet-1k top-1 {w.top1}{top5} (reported)",
                notes=(f"top1={w.top1}", f"reported in {w.reported_in}"))


default_cfgs = generate_default_cfgs({
    **{f"{w.model}.{w.tag}": _released_cfg(w) for w in RELEASED_WEIGHTS},
    **{name: _cfg(name) for name in _NO_WEIGHTS},
})


def released(name: str) -> ReleasedWeights | None:
    """The released weights of ``"model"`` (its default tag) or ``"model.tag"``; None if there are none."""
    model, _, tag = name.partition(".")
    for w in RELEASED_WEIGHTS:
        if w.model == model and (not tag or w.tag == tag):
            return w
    return None


def resolve_weights(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """For ``pretrained=True``: make sure timm will find a weight source, fetching Hub files first.

    Args:
        variant: the registered model name.
        kwargs: the keyword arguments ``timm.create_model`` passed to the entrypoint (``pretrained_cfg``
            may hold the tag, ``pretrained_cfg_overlay`` a ``file`` or ``state_dict``, ``cache_dir`` the
            Hub cache).

    Returns:
        ``kwargs``, with the downloaded file in ``pretrained_cfg_overlay`` when the config names a Hub id.

    Raises:
        ValueError: the config has no weights and none were given.
        RuntimeError: the Hub file could not be fetched (no network and not in the cache).
    """
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=overlay)
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    # timm resets custom_load when an overlay names a file; keep it, so that every file goes through
    # VisionMamba.load_pretrained (pass custom_load=False in the overlay for timm's generic loader)
    if cfg.state_dict is not None or cfg.url:
        return kwargs
    if cfg.file:
        return {**kwargs, "pretrained_cfg_overlay": {"custom_load": True, **overlay}}
    if not cfg.hf_hub_id:
        tags = ", ".join(f"{w.model}.{w.tag}" for w in RELEASED_WEIGHTS)
        raise ValueError(f"no downloadable weights for {name}: pass pretrained_cfg_overlay=dict(file='ckpt.pth') "
                         f"(or build with pretrained=False and call shufflemamba.models.load_checkpoint); "
                         f"released weights: {tags}")
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    try:
        path = _hub_file(cfg.hf_hub_id, filename, kwargs.get("cache_dir"))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, HTTP errors: one message for all
        raise RuntimeError(
            f"could not fetch the weights of {name} from the Hugging Face Hub ({cfg.hf_hub_id}/{filename}): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}; without network, download "
            f"that file elsewhere and pass pretrained_cfg_overlay=dict(file=PATH)") from e
    return {**kwargs, "pretrained_cfg_overlay": {"custom_load": True, **overlay, "file": path}}


def _hub_file(hub_id: str, filename: str, cache_dir: str | os.PathLike | None) -> str:
    """The local path of a Hub file: from the cache when it is there, else downloaded."""
    from huggingface_hub import constants, hf_hub_download

    repo, _, revision = hub_id.partition("@")
    get = dict(repo_id=repo, filename=filename, revision=revision or None, cache_dir=cache_dir)
    try:
        return hf_hub_download(**get, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the error types vary across huggingface_hub versions)
        if constants.HF_HUB_OFFLINE:
            raise ConnectionError("HF_HUB_OFFLINE is set and the file is not in the Hub cache") from None
    # huggingface_hub retries a failed request five times with back-off (about 25 s) before it gives
    # up; when the Hub's host name does not even resolve there is no network, so say so at once. A
    # proxy may resolve names itself, so with one configured leave it to huggingface_hub.
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.getaddrinfo(host, 443)
        except OSError as e:
            raise ConnectionError(f"cannot resolve {host} (no network?)") from e
    return hf_hub_download(**get)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> Any:
    """Load a released (or our own) checkpoint file into a model built for ``pretrained=True``.

    The ``model`` entry is loaded (``weights_only`` with ``argparse.Namespace`` allowed), pos_embed is
    resized to the model's grid, and entries that do not fit another class count or register layout
    are dropped and named in one log line; the backbone must match.
    """
    return init_from_checkpoint(model, path, key=None)
