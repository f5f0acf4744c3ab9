"""The paper's pair on one device: Vim-Ti (24 blocks) against DeiT-Ti (12 blocks), as users compare them.

Inference at 224 px and at 1024 px (where the Vim's linear scan should overtake attention's quadratic
cost) and training at 224 px, fp32, both models timed round-robin in one process
(:func:`~shufflemamba.bench.timing.time_interleaved`). Each row carries the multiply-adds per image
of both models, so a ratio can be held against its arithmetic parity (DeiT MACs / Vim MACs), and the
peak resident memory of each model's step, measured in a fresh process each (the only way to read a
CPU peak per model: the allocator keeps what a process once used; Linux's /proc, VmHWM).

Where the Vim's ``in_proj`` / ``out_proj`` run on oneDNN (``ops.cpu_linear``: measured faster than torch's
BLAS on this CPU), a third model is timed alongside: DeiT-Ti with its linear layers on oneDNN too, so that
each row also gives the like-for-like ratio, the two architectures on the same GEMM.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from typing import Any, Literal

import torch

from ..ops.cpu_linear import convert_linears, onednn_runs
from ..process import tune_malloc
from .report import pair_markdown
from .timing import time_interleaved, train_step_fn

VIM, DEIT = "vim_tiny_patch16_224", "deit_tiny_patch16_224"
# (mode, image size, batch): the rows of the comparison
ROWS: tuple[tuple[Literal["inference", "training"], int, int], ...] = (
    ("inference", 224, 8), ("inference", 1024, 1), ("training", 224, 8),
)
QUICK_ROWS = (("inference", 32, 2), ("training", 32, 2))


def vim_macs(img: int, *, patch: int = 16, dim: int = 192, depth: int = 24, d_state: int = 16,
             d_conv: int = 4, expand: int = 2, in_chans: int = 3) -> int:
    """Multiply-adds of one image through a Vim: per token and block, in_proj (D x 2E), out_proj (E x D)
    and, per direction, the depthwise conv (E k), x_proj (E (R + 2N)), dt_proj (R E) and the scan
    (3 E N: the decay times the state, delta B u into it, C read out)."""
    tokens = (img // patch) ** 2 + 1
    e, r = expand * dim, math.ceil(dim / 16)
    per_direction = e * d_conv + e * (r + 2 * d_state) + r * e + 3 * e * d_state
    per_block = dim * 2 * e + 2 * per_direction + e * dim
    return tokens * (depth * per_block + in_chans * patch * patch * dim)


def vit_macs(img: int, *, patch: int = 16, dim: int = 192, depth: int = 12, mlp_ratio: float = 4.0,
             in_chans: int = 3) -> int:
    """Multiply-adds of one image through a ViT: per token and block, qkv and proj (4 D^2), the MLP
    (2 r D^2) and attention's two products (2 T D)."""
    tokens = (img // patch) ** 2 + 1
    per_block = 4 * dim * dim + int(2 * mlp_ratio * dim * dim) + 2 * tokens * dim
    return tokens * (depth * per_block + in_chans * patch * patch * dim)


def _build(name: str, img: int, quick: bool) -> torch.nn.Module:
    import timm

    from .. import models  # noqa: F401  (registers the Vim names in timm)

    kwargs: dict[str, Any] = {"img_size": img}
    if quick:
        kwargs["depth"] = 2
    if name == VIM:
        kwargs["slws_rate"] = 0.0
    return timm.create_model(name, **kwargs)


def _step(model: torch.nn.Module, mode: str, img: int, batch: int, device: torch.device):
    if mode == "training":
        return train_step_fn(model, batch, img, device, None)
    x = torch.randn(batch, 3, img, img, device=device)
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    return infer


def peak_rss_mb(name: str, mode: str, img: int, batch: int, quick: bool) -> float:
    """Peak resident memory (MB) of a fresh process that builds ``name`` and runs two steps."""
    return child_peak_mb("from shufflemamba.bench.paper_pair import _child_steps; "
                         f"_child_steps({name!r}, {mode!r}, {img}, {batch}, {quick})")


def child_peak_mb(code: str) -> float:
    """Run ``code`` in a fresh Python and return its peak resident memory in MB: the kernel's VmHWM of
    the new address space (getrusage's ru_maxrss would carry over this process's own peak through
    fork and exec)."""
    code += "\nprint(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "peak child failed")
    return float(out.stdout.strip().splitlines()[-1]) / 1024  # kB


def _child_steps(name: str, mode: str, img: int, batch: int, quick: bool) -> None:
    step = _step(_build(name, img, quick), mode, img, batch, torch.device("cpu"))
    for _ in range(2):
        step()


def bench_paper_pair(device: torch.device, quick: bool, repeats: int, peak_memory: bool | None = None) -> list[dict[str, Any]]:
    """One record per row: seconds per step of each model, the DeiT / Vim time ratio (Vim's speed
    relative to DeiT's, > 1 when the Vim is faster), MACs and parity, and peak memory on the CPU
    (``peak_memory`` None: measured unless ``quick``; each costs a process start)."""
    peak_memory = not quick if peak_memory is None else peak_memory
    records = []
    for mode, img, batch in (QUICK_ROWS if quick else ROWS):
        vim, deit = _build(VIM, img, quick).to(device), _build(DEIT, img, quick).to(device)
        steps = {"vim": _step(vim, mode, img, batch, device), "deit": _step(deit, mode, img, batch, device)}
        if onednn_runs(device):
            deit_same = convert_linears(_build(DEIT, img, quick).to(device))
            steps["deit_same_gemm"] = _step(deit_same, mode, img, batch, device)
        times = time_interleaved(steps, repeats, warmup=1, device=device)
        ratios = [d / v for v, d in zip(times["vim"], times["deit"])]
        vm, dm = vim_macs(img, depth=2 if quick else 24), vit_macs(img, depth=2 if quick else 12)
        rec: dict[str, Any] = {
            "mode": mode, "img_size": img, "batch": batch, "repeats": repeats,
            "vim_s": statistics.median(times["vim"]), "deit_s": statistics.median(times["deit"]),
            "vim_vs_deit": statistics.median(ratios), "vim_gmacs": vm / 1e9, "deit_gmacs": dm / 1e9,
            "parity": dm / vm,
        }
        if "deit_same_gemm" in times:
            rec["deit_same_gemm_s"] = statistics.median(times["deit_same_gemm"])
            rec["vim_vs_deit_same_gemm"] = statistics.median(d / v for v, d in zip(times["vim"], times["deit_same_gemm"]))
        if peak_memory and device.type == "cpu":
            rec["vim_peak_mb"] = peak_rss_mb(VIM, mode, img, batch, quick)
            rec["deit_peak_mb"] = peak_rss_mb(DEIT, mode, img, batch, quick)
        records.append(rec)
        del vim, deit, steps
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shufflemamba.bench.paper_pair", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the records here")
    args = p.parse_args(argv)
    # the `shufflemamba` command's malloc setting, which its figures (docs/benchmarks.md) ran with: without
    # it each step faults its tensors in again (Vim-Ti's inference at 224 px 113 against 78 ms, the Zen 5)
    tune_malloc()
    records = bench_paper_pair(torch.device("cpu"), args.quick, args.repeats)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)
    print("\n".join(pair_markdown(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
