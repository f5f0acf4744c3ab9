"""Our Vim against timm's ViT of the same width, depth and token count: training images/s, one process.

Issue 12's yardstick for the CPU path: a Vim should train at least as fast as the plain ViT it is
meant to replace. Both models get the same embedding width D, depth, patch size, image size and a
class token (so the same number of tokens), the same batch, AdamW (torch's fused kernel, as
training builds it) and fp32 (bf16 autocast on CUDA). The ViT
has D / 32 heads and MLP ratio 4 (timm's defaults); the Vim has d_state and expand as given, SLWS
off (its shuffle costs < 1% of a step, measured in the training-step section).

The two step functions are timed round-robin in one process (:func:`~shufflemamba.bench.timing.time_interleaved`), so a
change in machine load hits both alike; the ratio of each interleaved pair's times is reported. Where the
Vim's in_proj / out_proj run on oneDNN (``ops.cpu_linear``), a ViT with its linears on oneDNN too is timed
alongside: the like-for-like ratio.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import torch

from ..ops.cpu_linear import convert_linears, onednn_runs
from .timing import time_interleaved, train_step_fn

PAIRS_SECONDS = 15.0  # time spent on the interleaved pairs of one setup (not counting the warm-up)
MAX_PAIRS = 80

# name -> settings shared by both models, and the Vim's own
SETUPS: dict[str, dict[str, Any]] = {
    # the demo's model (configs/demo.yaml): Fashion-MNIST resized to 16 px, patch 4 -> 16 patches + class token
    "demo (D 96, depth 4, 17 tokens)": dict(
        shared=dict(img_size=16, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_classes=10), batch=128,
        vim=dict(d_state=8, cls_position="head"),
    ),
    # the demo's model at Fashion-MNIST's own 28 px (49 patches + class token): three times the tokens
    "demo at 28 px (D 96, depth 4, 50 tokens)": dict(
        shared=dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_classes=10), batch=128,
        vim=dict(d_state=8, cls_position="head"),
    ),
    # Vim-Ti's width and half its depth at 64 px, patch 8 -> 64 patches + class token
    "D 192, depth 12, 65 tokens": dict(
        shared=dict(img_size=64, patch_size=8, in_chans=3, embed_dim=192, depth=12, num_classes=100), batch=64,
        vim=dict(d_state=16, cls_position="middle"),
    ),
}


def vim_and_vit(setup: dict[str, Any], quick: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    shared = dict(setup["shared"])
    if quick:  # the same code paths at a size that runs in a second
        shared.update(depth=2, embed_dim=32)
    vim = timm.create_model("vim_tiny_patch16_224", slws_rate=0.0, **shared, **setup["vim"])
    vit = VisionTransformer(num_heads=max(1, shared["embed_dim"] // 32), mlp_ratio=4.0, class_token=True,
                            global_pool="token", **shared)
    return vim, vit


def _quartiles(values: list[float]) -> tuple[float, float] | None:
    """The lower and upper quartiles (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def bench_vs_vit(device: torch.device, quick: bool, repeats: int, amp: torch.dtype | None) -> dict[str, Any]:
    """Training images/s of our Vim and timm's ViT at each of :data:`SETUPS`, interleaved in one process."""
    out: dict[str, Any] = {"amp": str(amp) if amp else None, "threads": torch.get_num_threads(), "setups": {}}
    for name, setup in SETUPS.items():
        batch = 4 if quick else setup["batch"]
        rec: dict[str, Any] = {"batch": batch}
        out["setups"][name] = rec
        try:
            vim, vit = vim_and_vit(setup, quick)
            img, chans = setup["shared"]["img_size"], setup["shared"]["in_chans"]  # --quick keeps both
            models = [("vim", vim), ("vit", vit)]
            if onednn_runs(device):  # the Vim's linears on oneDNN: ViT's on it too, for the like-for-like ratio
                models.append(("vit_same_gemm", convert_linears(copy.deepcopy(vit))))
            fns = {key: train_step_fn(model.to(device), batch, img, device, amp, chans) for key, model in models}
            # as many pairs as fit PAIRS_SECONDS (at least `repeats`, at most MAX_PAIRS): a short step's
            # ratio is noisy pair by pair, and a median over a few pairs moves from run to run
            first = time_interleaved(fns, 1, 2, device)
            pair_s = sum(v[0] for v in first.values())
            n = repeats if quick else min(MAX_PAIRS, max(repeats, math.ceil(PAIRS_SECONDS / max(pair_s, 1e-6))))
            times = time_interleaved(fns, n, 0, device)
        except Exception as e:  # one setup failing must not lose the others' figures
            rec["status"] = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            continue
        vim_s, vit_s = statistics.median(times["vim"]), statistics.median(times["vit"])
        ratios = [a / b for a, b in zip(times["vit"], times["vim"])]  # each pair's ViT time / Vim time
        rec.update(
            status="ok", tokens=vim.pos_embed.shape[1],
            params_vim=sum(p.numel() for p in vim.parameters()), params_vit=sum(p.numel() for p in vit.parameters()),
            ms_vim=vim_s * 1e3, ms_vit=vit_s * 1e3, images_per_s_vim=batch / vim_s, images_per_s_vit=batch / vit_s,
            # each interleaved pair ran back to back: the median of their ratios is the steadiest figure
            vim_over_vit_paired=statistics.median(ratios),
            vim_over_vit_quartiles=_quartiles(ratios),
            repeats=n,
        )
        if "vit_same_gemm" in times:
            rec["vim_over_vit_same_gemm_paired"] = statistics.median(
                a / b for a, b in zip(times["vit_same_gemm"], times["vim"]))
        del vim, vit, fns
    return out
