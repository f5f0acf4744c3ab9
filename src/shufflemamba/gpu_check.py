"""One command that proves a GPU machine: ``make gpu-check`` / ``shufflemamba doctor --gpu``.

Uses only what the machine already has (its torch, timm, triton, and mamba_ssm / causal-conv1d if
installed); nothing is fetched. Without a CUDA device it prints one line and exits 0. With one it
runs the sections below within a time budget (default 420 s, under the 8 minutes promised). Each
section gets its own time box, a share of what is left; on CUDA every section after the first runs
in a child process killed at the end of its box (Triton compiles each kernel variant on first use,
for as long as it takes), and inside a section every shape, impl and model is guarded and checks
the box, so a failure or an overrun costs that item, not the section or the run:

1. ``environment``: device, torch / CUDA / triton / timm versions, which scan kernels can run.
2. ``pytest``: the GPU tests, ``pytest -m gpu`` on the repository's tests/ (a subprocess, with the
   CPU kernels' build switched off: SHUFFLEMAMBA_NO_COMPILE=1).
3. ``parity``: forward output and all eight gradients of every scan implementation present
   (torch, triton, mamba_ssm) against the float64 reference, on Vim-Ti and Vim-S mixer shapes, fp32
   and bf16, both scan directions.
4. ``scan_timing``: forward+backward time of each implementation at batch 32 and the bandwidth that
   implies (minimum-traffic byte count, as ``shufflemamba bench``), vs a measured copy peak.
5. ``train_step``: a Vim-S training step at batch 64 under bf16 autocast (img/s, peak memory) with
   each fast scan present, and timm's deit_small_patch16_224 at the same settings.
6. ``slws``: SLWS overhead at rate 0.5 on Vim-Ti and Vim-S steps, one model at a time.
7. ``short_train``: Vim-S trained for 200 bf16 steps on a fixed synthetic set with each scan
   implementation present, from the same initial weights: the losses must agree.

It writes one JSON report and a markdown section between ``<!-- gpu-check:begin -->`` and
``<!-- gpu-check:end -->`` in docs/benchmarks.md. ``shufflemamba doctor`` without ``--gpu`` prints
the environment section only. ``--device cpu --quick`` runs every section on tiny sizes on the CPU:
that is how the tests check this module on machines without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
REPO = Path(__file__).resolve().parents[2]  # src/shufflemamba/gpu_check.py -> repository root
SHAPES = {"vim_ti": dict(E=384, L=197, N=16), "vim_s": dict(E=768, L=197, N=16)}
QUICK_SHAPES = {"vim_ti": dict(E=16, L=9, N=4), "vim_s": dict(E=24, L=9, N=4)}
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # max |err| / max |reference|, per tensor
SECTIONS = ("environment", "pytest", "parity", "scan_timing", "train_step", "slws", "short_train")
# each section's share of the budget left when it starts (relative to the sections after it)
SHARES = {"pytest": 0.22, "parity": 0.12, "scan_timing": 0.14, "train_step": 0.16, "slws": 0.12, "short_train": 0.24}
LOSS_AGREEMENT = 0.1  # short_train: windowed mean losses of two impls within 10% of the first window's


def _version(mod: str) -> str | None:
    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return None


def _error(exc: BaseException) -> dict[str, str]:
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=6)[-3000:]}


def _scan_impls(device: torch.device, with_mamba_ssm: bool = True) -> list[str]:
    """The fast selective-scan implementations that can run on ``device`` here (mamba_ssm only if
    ``with_mamba_ssm``: finding out runs its kernel)."""
    from .ops.mamba_ssm_glue import mamba_ssm_scan

    impls = ["torch"]
    if device.type == "cuda":
        try:
            from .ops.triton_scan import triton_available
        except ImportError:
            pass
        else:
            if triton_available(device):
                impls.append("triton")
    elif device.type == "cpu":
        impls.insert(0, "cpu")
    if with_mamba_ssm and mamba_ssm_scan(device) is not None:  # it imports and a trial call ran here
        impls.append("mamba_ssm")
    return impls


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


_TIME_BOX = {"status": "skipped", "reason": "section time box spent"}


# -- sections -------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device, and which scan kernels import (with the reason when one does not)."""
    from .ops.mamba_ssm_glue import status

    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "timm": _version("timm"), "triton": _version("triton"), "mamba_ssm": _version("mamba_ssm"),
        "causal_conv1d": _version("causal_conv1d") or _version("causal-conv1d"),
        "kernels": status(device), "scan_impls": _scan_impls(device), "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        from shufflemamba.reports import cpu_model

        out.update(device_name=cpu_model())
    from .ops.selective_scan import _resolve_impl

    out["auto_impl"] = {dt: _resolve_impl("auto", device, getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    return out


def _run_group(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> tuple[int | None, str, str]:
    """Run ``cmd`` in its own process group; at ``timeout_s`` kill the whole group (a compiler it
    started included). Returns (exit code or None on timeout, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 0.1))
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return None, out, err


def run_pytest(timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` on the repository's tests, in a subprocess killed after ``timeout_s``; the
    summary line and exit code. The CPU kernels are not built for it (SHUFFLEMAMBA_NO_COMPILE=1):
    collection would otherwise compile them, and no GPU test needs them."""
    import importlib.util

    tests = REPO / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"no tests/ next to the package ({tests})"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed in this environment"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SHUFFLEMAMBA_NO_COMPILE"] = "1"
    t0 = time.perf_counter()
    rc, stdout, stderr = _run_group(cmd, timeout_s, env=env, cwd=REPO)
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if rc is None:
        return {"status": "error", "error": f"pytest -m gpu did not finish in its {timeout_s:.0f} s time box",
                "output_tail": "\n".join(lines[-30:])}
    summary = lines[-1] if lines else (stderr.strip().splitlines() or [""])[-1]
    # exit code 5: no test selected (all deselected), which pytest counts as a failure
    ok = rc == 0
    return {"status": "ok" if ok else "fail", "returncode": rc, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": "\n".join(lines[-30:]) if not ok else ""}


def _inputs(batch: int, E: int, L: int, N: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from .bench import _scan_inputs

    return _scan_inputs(batch, E, L, N, device, dtype, seed)


def parity(device: torch.device, impls: list[str], shapes: dict[str, dict[str, int]], batch: int,
           deadline: float | None = None, rows: list | None = None) -> list[dict]:
    """Every impl vs the float64 reference on the same (rounded) inputs: worst scaled error per tensor."""
    from .ops.selective_scan import selective_scan

    torch.manual_seed(0)
    rows = [] if rows is None else rows
    for shape, s in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).split(".")[-1]
            for reverse in (False, True):
                rec = dict(shape=shape, dtype=dname, reverse=reverse, batch=batch, **s)
                if _expired(deadline):
                    rows.extend(dict(rec, impl=impl, **_TIME_BOX) for impl in impls)
                    continue
                try:
                    inputs = _inputs(batch, s["E"], s["L"], s["N"], device, dtype)
                    gout = torch.randn(batch, s["E"], s["L"], device=device).to(dtype)
                    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
                    ref = selective_scan(**ref_leaves, delta_softplus=True, impl="ref", reverse=reverse)
                    ref.backward(gout.double())
                except Exception as exc:  # e.g. out of memory: this shape's rows say so
                    rows.extend(dict(rec, impl=impl, **_error(exc)) for impl in impls)
                    continue
                for impl in impls:
                    row: dict[str, Any] = dict(rec, impl=impl)
                    if _expired(deadline):
                        rows.append(dict(row, **_TIME_BOX))
                        continue
                    try:
                        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
                        out = selective_scan(**leaves, delta_softplus=True, impl=impl, reverse=reverse)
                        out.backward(gout)
                        errs = {"out": _scaled_err(out, ref)}
                        errs.update({f"d{k}": _scaled_err(leaves[k].grad, ref_leaves[k].grad) for k in leaves})
                    except Exception as exc:
                        rows.append(dict(row, **_error(exc)))
                        continue
                    worst = max(errs, key=errs.get)
                    ok = all(math.isfinite(e) for e in errs.values()) and errs[worst] <= TOLERANCE[dname]
                    rows.append(dict(row, status="ok" if ok else "FAIL", worst=worst, worst_err=errs[worst],
                                     errors=errs))
    return rows


def _scaled_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() or 1.0
    return (x.double() - ref).abs().max().item() / scale


def _copy_peak(device: torch.device, nbytes: int, repeats: int) -> float:
    from .bench import _time_interleaved

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=2, device=device)["copy"]
    return 2 * nbytes / statistics.median(t) / 1e9  # read + write


def scan_timing(device: torch.device, impls: list[str], shapes: dict[str, dict[str, int]], batch: int,
                repeats: int, quick: bool, deadline: float | None = None, rows: list | None = None) -> dict[str, Any]:
    """Forward+backward ms of the reference and each impl (interleaved medians), GB/s and % of copy peak."""
    from .bench import _scan_bytes, _time_interleaved
    from .ops.selective_scan import selective_scan

    peak = _copy_peak(device, (16 if quick else 1024) * 2**20, max(repeats, 5))
    rows = [] if rows is None else rows
    for shape, s in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            rec = dict(shape=shape, dtype=str(dtype).split(".")[-1], batch=batch, **s)
            if _expired(deadline):
                rows.extend(dict(rec, impl=impl, **_TIME_BOX) for impl in ["ref", *impls])
                continue
            try:
                inputs = _inputs(batch, s["E"], s["L"], s["N"], device, dtype)
                gout = torch.randn(batch, s["E"], s["L"], device=device).to(dtype)
            except Exception as exc:
                rows.extend(dict(rec, impl=impl, **_error(exc)) for impl in ["ref", *impls])
                continue
            fns: dict[str, Callable[[], None]] = {}
            for impl in ["ref", *impls]:
                def step(impl: str = impl) -> None:
                    for t in inputs.values():
                        t.grad = None
                    selective_scan(**inputs, delta_softplus=True, impl=impl).backward(gout)

                if _expired(deadline):
                    rows.append(dict(rec, impl=impl, **_TIME_BOX))
                    continue
                try:  # one untimed call first (Triton compiles here): a failing impl is left out
                    step()
                except Exception as exc:
                    rows.append(dict(rec, impl=impl, **_error(exc)))
                    continue
                fns[impl] = step
            try:
                times = _time_interleaved(fns, repeats, warmup=1, device=device)
            except Exception as exc:
                rows.extend(dict(rec, impl=impl, **_error(exc)) for impl in fns)
                continue
            nbytes = _scan_bytes(batch, s["E"], s["L"], s["N"], torch.finfo(dtype).bits // 8)
            ref_ms = statistics.median(times["ref"]) * 1e3 if "ref" in times else None
            for name, ts in times.items():
                ms = statistics.median(ts) * 1e3
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(rec, impl=name, status="ok", ms_fwd_bwd=ms, speedup_vs_ref=ref_ms / ms if ref_ms else None,
                                 gbytes_per_s=gbs, fraction_of_copy_peak=gbs / peak))
    return {"status": "ok", "copy_peak_gbytes_per_s": peak, "rows": rows}


def _step_record(name: str, device: torch.device, batch: int, img: int, repeats: int, quick: bool,
                 **kwargs: Any) -> dict[str, Any]:
    from .bench import _make_model, _time_interleaved, _train_step_fn

    rec: dict[str, Any] = dict(model=name, batch=batch, img_size=img, amp="bfloat16", **kwargs)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = _make_model(name, quick, device, **kwargs)
        step = _train_step_fn(model, batch, img, device, torch.bfloat16)
        ts = _time_interleaved({"s": step}, repeats, warmup=3, device=device)["s"]
        rec.update(status="ok", ms=statistics.median(ts) * 1e3, images_per_s=batch / statistics.median(ts),
                   peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None)
        del model, step
    except Exception as exc:
        rec.update(_error(exc))
    return rec


def train_step(device: torch.device, impls: list[str], batch: int, repeats: int, quick: bool,
               deadline: float | None = None, rows: list | None = None) -> dict[str, Any]:
    """Vim-S with each fast scan present (auto's choice first) and DeiT-S: one bf16 AdamW step each."""
    img = 32 if quick else 224
    fast = [i for i in impls if i in ("mamba_ssm", "triton")] or impls[:1]
    rows = [] if rows is None else rows
    plan = [("deit_small_patch16_224", {}), *(("vim_small_patch16_224", {"scan_impl": i}) for i in fast)]
    for name, kw in plan:  # DeiT-S first: the comparison every Vim-S row needs
        if _expired(deadline):
            rows.append(dict(model=name, batch=batch, **kw, **_TIME_BOX))
            continue
        rows.append(_step_record(name, device, batch, img, repeats, quick, **kw))
    deit = rows[0].get("images_per_s")
    for r in rows[1:]:
        if deit and r.get("images_per_s"):
            r["vs_deit_s"] = r["images_per_s"] / deit
    return {"status": "ok", "rows": rows}


def slws(device: torch.device, batch: int, repeats: int, quick: bool, deadline: float | None = None,
         rows: list | None = None) -> dict[str, Any]:
    """SLWS overhead at rate 0.5, as ``bench.bench_train`` measures it, one model at a time: a model
    that fails or meets the end of the time box is recorded as such, and the others still count."""
    from .bench import _make_model, _slws_ops_ms, _time_interleaved, _train_step_fn

    img = 32 if quick else 224
    rows = [] if rows is None else rows
    for name in ("vim_tiny_patch16_224", "vim_small_patch16_224"):
        rec: dict[str, Any] = {"model": name}
        if _expired(deadline):
            rows.append(dict(rec, **_TIME_BOX))
            continue
        try:
            model = _make_model(name, quick, device)
            step = _train_step_fn(model, batch, img, device, torch.bfloat16)

            def run(rate: float) -> None:
                model.set_slws(rate)
                step()

            times = _time_interleaved({"off": lambda: run(0.0), "slws_0.5": lambda: run(0.5)}, repeats, 1, device)
            off, on = statistics.median(times["off"]), statistics.median(times["slws_0.5"])
            # the ratio of each interleaved pair is steadier than the ratio of medians on a busy machine
            paired = statistics.median(b / a for a, b in zip(times["off"], times["slws_0.5"]))
            rec.update(status="ok", ms_off=off * 1e3, ms_slws=on * 1e3, images_per_s_off=batch / off,
                       images_per_s_slws=batch / on, slws_overhead=on / off - 1, slws_overhead_paired=paired - 1,
                       slws_ops_ms=_slws_ops_ms(model, batch, img, device, repeats), repeats=repeats)
            del model, step
        except Exception as exc:
            rec.update(_error(exc))
        rows.append(rec)
    return {"status": "ok", "batch": batch, "img_size": img, "amp": "bfloat16",
            "models": {r["model"]: r for r in rows}}


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
    import timm

    import torch.nn.functional as F

    img, classes = (32 if quick else 224), 10
    window = 10 if steps >= 50 else max(1, steps // 3)
    data = _synthetic_batches(8, batch, img, classes)
    rows = [] if rows is None else rows
    fast_first = ("mamba_ssm", "triton", "cpu", "torch")  # the slow pure-PyTorch path last: the box may end it
    for impl in sorted(impls, key=lambda i: fast_first.index(i) if i in fast_first else len(fast_first)):
        rec: dict[str, Any] = {"impl": impl, "steps": 0, "losses": []}
        if _expired(deadline):
            rows.append(dict(rec, **_TIME_BOX))
            continue
        try:
            torch.manual_seed(0)  # the same initial weights for every impl
            kw = dict(img_size=32, depth=2) if quick else {}
            model = timm.create_model("vim_small_patch16_224", num_classes=classes, scan_impl=impl, **kw).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
            model.train()
            t0 = time.perf_counter()
            for i in range(steps):
                if _expired(deadline):
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
            rec.update(_error(exc))
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


# -- child processes: a section in its own process, killed at the end of its time box ----------------------
class _Rows(list):
    """A section's rows, written to ``path`` as each arrives: what a killed child got done survives."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _flush(self) -> None:  # write and rename: a kill mid-write leaves the previous file whole
        Path(self.path + ".tmp").write_text(json.dumps(list(self), default=str))
        os.replace(self.path + ".tmp", self.path)

    def append(self, item: Any) -> None:
        super().append(item)
        self._flush()

    def extend(self, items: Any) -> None:
        super().extend(items)
        self._flush()


def _section_call(name: str, device: torch.device, impls: list[str], quick: bool, deadline: float | None,
                  rows: list | None) -> dict[str, Any]:
    """Run section ``name`` with the sizes the check uses."""
    shapes = QUICK_SHAPES if quick else SHAPES
    repeats = 3 if quick else 10
    if name == "environment":
        return environment(device)
    if name == "parity":
        return {"status": "ok", "rows": parity(device, impls, shapes, 2 if quick else 8, deadline, rows)}
    if name == "scan_timing":
        return scan_timing(device, impls, shapes, 2 if quick else 32, repeats, quick, deadline, rows)
    if name == "train_step":
        return train_step(device, impls, 2 if quick else 64, repeats, quick, deadline, rows)
    if name == "slws":
        return slws(device, 2 if quick else 64, repeats, quick, deadline, rows)
    if name == "short_train":
        return short_train(device, impls, 6 if quick else 200, 2 if quick else 32, quick, deadline, rows)
    raise ValueError(f"unknown section {name!r}")


def _child_main(spec_path: str) -> None:
    """Entry point of a section's child process: the spec says which section, where to write."""
    spec = json.loads(Path(spec_path).read_text())
    deadline = time.monotonic() + spec["box_s"]
    rows = _Rows(spec["rows_path"])
    try:
        res = _section_call(spec["section"], torch.device(spec["device"]), spec["impls"], spec["quick"], deadline, rows)
    except Exception as exc:
        res = dict(_error(exc), rows=list(rows))
    Path(spec["result_path"]).write_text(json.dumps(res, default=str))


def _in_child(name: str, device: torch.device, impls: list[str], quick: bool, box_s: float) -> dict[str, Any]:
    """Section ``name`` in a child process: it stops starting work when its box is spent and is killed
    a little later (a compile or a kernel that does not return); its rows so far are kept."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        paths = {k: str(Path(tmp) / f"{k}.json") for k in ("spec", "rows", "result")}
        grace = min(30.0, 0.15 * box_s)  # the child's own deadline comes first; the kill is the backstop
        Path(paths["spec"]).write_text(json.dumps(dict(section=name, device=str(device), impls=impls, quick=quick,
                                                       box_s=box_s - grace, rows_path=paths["rows"],
                                                       result_path=paths["result"])))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                         os.environ.get("PYTHONPATH")])))
        if device.type == "cuda":  # nothing on a GPU needs the CPU kernels: never build them here
            env["SHUFFLEMAMBA_NO_COMPILE"] = "1"
        code = "import sys; from shufflemamba.gpu_check import _child_main; _child_main(sys.argv[1])"
        rc, _, stderr = _run_group([sys.executable, "-c", code, paths["spec"]], box_s, env=env)
        if Path(paths["result"]).exists():
            return json.loads(Path(paths["result"]).read_text())
        rows = json.loads(Path(paths["rows"]).read_text()) if Path(paths["rows"]).exists() else []
        why = (f"killed at the end of its {box_s:.0f} s time box" if rc is None
               else f"child process exited {rc}: {(stderr.strip().splitlines() or [''])[-1][:300]}")
        return {"status": "error", "error": why, "rows": rows}


# -- report ---------------------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".1f") -> str:
    from shufflemamba.reports import format_number

    return format_number(x, spec)


def to_markdown(rep: dict[str, Any]) -> str:
    env = rep.get("environment", {})
    m = rep["meta"]
    lines = ["## GPU check (`make gpu-check`)", "",
             f"Run {m['date']}{' (--quick: tiny sizes, a smoke test of the check itself)' if m['quick'] else ''} on "
             f"**{env.get('device_name', m['device'])}** ({m['device']}), torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, triton {env.get('triton')}, timm {env.get('timm')}, mamba_ssm {env.get('mamba_ssm')}, "
             f"causal-conv1d {env.get('causal_conv1d')}; scan impls {', '.join(env.get('scan_impls', []))}; "
             f"\"auto\" picks {env.get('auto_impl')}. {m['seconds']:.0f} s in all.", ""]
    for name in SECTIONS:
        sec = rep.get(name, {})
        if sec.get("status") not in ("ok", "fail", None):
            lines += [f"**{name}**: {sec.get('status')}: {sec.get('error') or sec.get('reason', '')}", ""]
    p = rep.get("pytest", {})
    if p.get("status") in ("ok", "fail"):
        lines += [f"`pytest -m gpu`: **{p['status']}** ({p.get('summary')}, {p.get('seconds')} s)", ""]
    par = rep.get("parity", {})
    if par.get("rows"):
        lines += ["### Scan parity vs the float64 reference (max |err| / max |ref|, worst of out and 8 gradients)", "",
                  "| shape | dtype | direction | impl | worst | error | status |", "|---|---|---|---|---|---|---|"]
        for r in par["rows"]:
            lines.append(f"| {r['shape']} (B {r['batch']}) | {r['dtype']} | {'reverse' if r['reverse'] else 'forward'} "
                         f"| {r['impl']} | {r.get('worst', '-')} | {_f(r.get('worst_err'), '.1e')} "
                         f"| {r['status']}{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    st = rep.get("scan_timing", {})
    if st.get("rows"):
        lines += [f"### Scan forward + backward (copy peak {_f(st.get('copy_peak_gbytes_per_s'))} GB/s)", "",
                  "| shape | dtype | impl | ms | vs ref | GB/s | % of copy peak | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            frac = r.get("fraction_of_copy_peak")
            lines.append(f"| {r['shape']} (B {r['batch']}) | {r['dtype']} | {r['impl']} | {_f(r.get('ms_fwd_bwd'), '.2f')} "
                         f"| {_f(r.get('speedup_vs_ref'), '.1f')}x | {_f(r.get('gbytes_per_s'))} "
                         f"| {_f(100 * frac if frac is not None else None)} | {r['status']}"
                         f"{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    ts = rep.get("train_step", {})
    if ts.get("rows"):
        lines += ["### Training step (AdamW, bf16 autocast)", "",
                  "| model | scan | batch | img/s | peak memory GiB | vs DeiT-S | status |", "|---|---|---|---|---|---|---|"]
        for r in ts["rows"]:
            lines.append(f"| {r['model']} | {r.get('scan_impl', '-')} | {r['batch']} | {_f(r.get('images_per_s'))} "
                         f"| {_f(r.get('peak_memory_gib'), '.2f')} | {_f(r.get('vs_deit_s'), '.2f')} "
                         f"| {r['status']}{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    sl = rep.get("slws", {})
    sl_models = sl.get("models") or {r["model"]: r for r in sl.get("rows", []) if "model" in r}
    if sl_models:
        lines += [f"### SLWS overhead at rate 0.5 (batch {sl.get('batch')}, bf16)", "",
                  "| model | img/s off | img/s 0.5 | overhead (median of pairs) | shuffle ops alone | status |",
                  "|---|---|---|---|---|---|"]
        for name, r in sl_models.items():
            ov = r.get("slws_overhead_paired")
            lines.append(f"| {name} | {_f(r.get('images_per_s_off'))} | {_f(r.get('images_per_s_slws'))} "
                         f"| {_f(100 * ov if ov is not None else None, '+.2f')}% | {_f(r.get('slws_ops_ms'), '.2f')} ms "
                         f"| {r.get('status')} |")
        lines.append("")
    tr = rep.get("short_train", {})
    if tr.get("rows"):
        lines += [f"### Short bf16 training run (Vim-S, batch {tr.get('batch')}, {tr.get('steps')} steps, synthetic data)",
                  "", f"Losses per impl, mean of each {tr.get('window')}-step window; the impls agree when every window "
                  f"is within {100 * tr.get('tolerance', LOSS_AGREEMENT):.0f}% of the first window's loss: "
                  f"**{'agree' if tr.get('agree') else 'do not agree' if 'agree' in tr else 'not compared'}**.", "",
                  "| impl | steps | first window | last window | max gap | s | status |", "|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            m = tr.get("window_means", {}).get(r["impl"], [])
            lines.append(f"| {r['impl']} | {r.get('steps')} | {_f(m[0] if m else None, '.3f')} "
                         f"| {_f(m[-1] if m else None, '.3f')} | {_f(tr.get('max_gap', {}).get(r['impl']), '.3f')} "
                         f"| {_f(r.get('seconds'))} | {r.get('status')}{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Put ``section`` between the gpu-check markers in ``path``, keeping everything else in the file."""
    from shufflemamba.reports import write_marked_section

    write_marked_section(path, section, BEGIN, END)


def time_boxes(left_s: float, sections: list[str]) -> float:
    """The first of ``sections``' box: its share of ``left_s`` among the shares of all of them, so time a
    section leaves unused goes to the ones after it."""
    return left_s * SHARES[sections[0]] / sum(SHARES[s] for s in sections)


def run_check(device: torch.device, *, quick: bool = False, budget_s: float = 420.0,
              skip: tuple[str, ...] = (), isolate: bool | None = None) -> dict[str, Any]:
    """Run the sections in order, each guarded and in its own time box (see :func:`time_boxes`).

    ``isolate`` (default: on CUDA) runs each section after ``environment`` and ``pytest`` in a child
    process killed at the end of its box; otherwise the sections run here and only stop starting new
    work when their box is spent.
    """
    t0 = time.perf_counter()
    isolate = device.type == "cuda" if isolate is None else isolate
    rep: dict[str, Any] = {"meta": {"date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": quick,
                                    "device": str(device), "budget_s": budget_s, "isolated": isolate}}
    print("[gpu-check] environment (0 s)", file=sys.stderr, flush=True)
    try:  # the report's header: always runs; in a child too when isolated (importing mamba_ssm and
        # its trial call are code we do not control), with a box of its own
        rep["environment"] = (_in_child("environment", device, [], quick, min(90.0, 0.15 * budget_s)) if isolate
                              else environment(device))
        impls = rep["environment"]["scan_impls"]
    except Exception as exc:
        rep["environment"] = rep.get("environment") or _error(exc)
        impls = _scan_impls(device, with_mamba_ssm=False)  # what needs no code of others to decide
    todo = [name for name in SECTIONS[1:] if name not in skip]
    for name in SECTIONS[1:]:
        if name in skip:
            rep[name] = {"status": "skipped", "reason": "--skip"}
            continue
        left = budget_s - (time.perf_counter() - t0)
        box = time_boxes(left, todo)
        todo.remove(name)
        if box < 1.0:
            rep[name] = {"status": "skipped", "reason": f"time budget ({budget_s:.0f} s) spent"}
            continue
        s0 = time.perf_counter()
        print(f"[gpu-check] {name} ({s0 - t0:.0f} s; box {box:.0f} s)", file=sys.stderr, flush=True)
        try:
            if name == "pytest":
                rep[name] = run_pytest(box)
            elif isolate:
                rep[name] = _in_child(name, device, impls, quick, box)
            else:
                rep[name] = _section_call(name, device, impls, quick, time.monotonic() + box, None)
        except Exception as exc:  # recorded; the next section still runs
            rep[name] = _error(exc)
        rep[name].update(started_s=round(s0 - t0, 1), seconds=round(time.perf_counter() - s0, 1), box_s=round(box, 1))
    rep["meta"]["seconds"] = time.perf_counter() - t0
    return rep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shufflemamba doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run the GPU check and write its report")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny smoke run, with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the check itself")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="the whole check's time budget: each section gets a share of what is left as its time box")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS[1:], help="sections to leave out")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run each section in a child process killed at the end of its time box "
                        "(auto: on CUDA; 'yes' tries it on the CPU)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "gpu-check.json"))
    p.add_argument("--markdown", default=str(REPO / "docs" / "benchmarks.md"))
    return p


def main(argv: list[str] | None = None) -> int:
    """``shufflemamba doctor [--gpu]``; returns the exit code (0 also when there is no GPU)."""
    from .config import UserError

    args = build_parser().parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    if not args.gpu:  # plain `doctor`: what this machine has
        device = torch.device("cuda" if torch.cuda.is_available() and args.device == "cuda" else "cpu")
        print(json.dumps(environment(device), indent=1))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing to check")
        return 0
    device = torch.device(args.device)
    rep = run_check(device, quick=args.quick, budget_s=args.budget_s, skip=tuple(args.skip),
                    isolate={"auto": None, "yes": True, "no": False}[args.isolate])
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    section = to_markdown(rep)
    write_markdown(Path(args.markdown), section)
    print(section)
    print(f"[gpu-check] wrote {json_path} and {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["doctor", *sys.argv[1:]]))
