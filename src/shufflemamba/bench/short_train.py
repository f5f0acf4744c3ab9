"""The GPU check's short training run: Vim-S for a few hundred bf16 steps on a fixed synthetic set with
each scan implementation, from the same initial weights; the loss curves must agree."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import timm
import torch
import torch.nn.functional as F

from .. import models  # noqa: F401  (registers the Vim names in timm)
from .boxes import TIME_BOX, error_row, expired

LOSS_AGREEMENT = 0.1  # windowed mean losses of two impls within 10% of the first window's


def _synthetic_batches(n_batches: int, batch: int, img: int, classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, learnable set: each class is a random image pattern, each sample that pattern plus noise."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(classes, 3, img, img, generator=g)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append((patterns[y] + 1.5 * torch.randn(batch, 3, img, img, generator=g), y))
    return out


def short_train(device: torch.device, impls: list[str], steps: int, batch: int, quick: bool,
                deadline: float | None = None, rows: list | None = None) -> dict[str, Any]:
    """Vim-S trained ``steps`` bf16 AdamW steps with each impl, same initial weights and batches; the
    losses (mean of each 10-step window) must agree within LOSS_AGREEMENT of the first window's."""
    img, classes = (32 if quick else 224), 10
    window = 10 if steps >= 50 else max(1, steps // 3)
    data = _synthetic_batches(8, batch, img, classes)
    rows = [] if rows is None else rows
    fast_first = ("mamba_ssm", "triton", "cpu", "torch")  # the slow pure-PyTorch path last: the box may end it
    for impl in sorted(impls, key=lambda i: fast_first.index(i) if i in fast_first else len(fast_first)):
        rec: dict[str, Any] = {"impl": impl, "steps": 0, "losses": []}
        if expired(deadline):
            rows.append(dict(rec, **TIME_BOX))
            continue
        try:
            torch.manual_seed(0)  # the same initial weights for every impl
            kw = dict(img_size=32, depth=2) if quick else {}
            model = timm.create_model("vim_small_patch16_224", num_classes=classes, scan_impl=impl, **kw).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
            model.train()
            t0 = time.perf_counter()
            for i in range(steps):
                if expired(deadline):
                    rec["reason"] = "section time box spent"
                    break
                x, y = (t.to(device) for t in data[i % len(data)])
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec["losses"].append(round(loss.item(), 5))
                rec["steps"] = i + 1
            rec.update(status="ok" if rec["steps"] == steps else "partial", seconds=round(time.perf_counter() - t0, 1))
            del model, opt
        except Exception as exc:
            rec.update(error_row(exc))
        rows.append(rec)
    out: dict[str, Any] = {"status": "ok", "batch": batch, "img_size": img, "steps": steps, "window": window,
                           "tolerance": LOSS_AGREEMENT, "rows": rows}
    out.update(loss_agreement(rows, window))
    if out.get("agree") is False:
        out["status"] = "FAIL"
    return out


def loss_agreement(rows: list[dict], window: int) -> dict[str, Any]:
    """Compare the loss curves of the rows that have at least one finite ``window``: the mean of each
    window against the first row's, as a fraction of the first row's first window. Empty with fewer
    than two such rows; else ``agree`` (every gap within LOSS_AGREEMENT), the means and the gaps."""
    done = [r for r in rows if r.get("steps", 0) >= window and all(math.isfinite(v) for v in r["losses"])]
    if len(done) < 2:
        return {}
    n = min(r["steps"] for r in done) // window * window
    means = {r["impl"]: [statistics.fmean(r["losses"][i:i + window]) for i in range(0, n, window)] for r in done}
    first = next(iter(means.values()))
    gap = {impl: max(abs(a - b) for a, b in zip(m, first)) / abs(first[0]) for impl, m in means.items()}
    return {"agree": max(gap.values()) <= LOSS_AGREEMENT, "window_means": means, "max_gap": gap, "compared_steps": n}
