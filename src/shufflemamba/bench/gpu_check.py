"""One command that proves a GPU machine: ``make gpu-check`` / ``shufflemamba doctor --gpu``.

Uses only what the machine already has (its torch, timm, triton, and mamba_ssm / causal-conv1d if
installed); nothing is fetched. Without a CUDA device it prints one line and exits 0. With one it
runs, each section guarded so that a failure is recorded and the rest still runs, within a time
budget (default 420 s, under the 8 minutes promised):

1. ``environment``: device, torch / CUDA / triton / timm versions, which scan kernels import.
2. ``pytest``: the GPU tests, ``pytest -m gpu`` on the repository's tests/ (a subprocess).
3. ``parity``: forward output and all eight gradients of every scan implementation present
   (torch, triton, mamba_ssm) against the float64 reference, on Vim-Ti and Vim-S mixer shapes, fp32
   and bf16, both scan directions.
4. ``scan_timing``: forward+backward time of each implementation at batch 32 and the bandwidth that
   implies (minimum-traffic byte count, as ``shufflemamba bench``), vs a measured copy peak.
5. ``train_step``: a Vim-S training step at batch 64 under bf16 autocast (img/s, peak memory) with
   each fast scan present, and timm's deit_small_patch16_224 at the same settings.
6. ``slws``: SLWS overhead at rate 0.5 on Vim-Ti and Vim-S steps (:func:`~shufflemamba.bench.suite.bench_train`).

It writes one JSON report and prints it as markdown (``benchmarks/docs_section.py gpu-check PATH`` puts
that section into docs/benchmarks.md; ``make gpu-check`` does both). ``shufflemamba doctor`` without ``--gpu`` prints
the environment section only. ``--device cpu --quick`` runs every section on tiny sizes on the CPU:
that is how the tests check this module on machines without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..ops.selective_scan import selective_scan
from .report import cpu_model, gpu_check_markdown
from .scan import min_scan_bytes, mixer_like_inputs
from .suite import bench_train
from .timing import make_model, time_interleaved, train_step_fn

REPO = Path(__file__).resolve().parents[3]  # src/shufflemamba/bench/gpu_check.py -> repository root
SHAPES = {"vim_ti": dict(E=384, L=197, N=16), "vim_s": dict(E=768, L=197, N=16)}
QUICK_SHAPES = {"vim_ti": dict(E=16, L=9, N=4), "vim_s": dict(E=24, L=9, N=4)}
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # max |err| / max |reference|, per tensor
SECTIONS = ("environment", "pytest", "parity", "scan_timing", "train_step", "slws")


def _version(mod: str) -> str | None:
    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return None


def _error(exc: BaseException) -> dict[str, str]:
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=6)[-3000:]}


def _scan_impls(device: torch.device) -> list[str]:
    """The fast selective-scan implementations that can run on ``device`` here."""
    from ..ops.mamba_ssm_glue import mamba_ssm_scan

    impls = ["torch"]
    if device.type == "cuda":
        try:
            from ..ops.triton_scan import triton_available
        except ImportError:
            pass
        else:
            if triton_available(device):
                impls.append("triton")
    elif device.type == "cpu":
        impls.insert(0, "cpu")
    if mamba_ssm_scan() is not None:
        impls.append("mamba_ssm")
    return impls


# -- sections -------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device, and which scan kernels import (with the reason when one does not)."""
    from ..ops.mamba_ssm_glue import status

    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "timm": _version("timm"), "triton": _version("triton"), "mamba_ssm": _version("mamba_ssm"),
        "causal_conv1d": _version("causal_conv1d") or _version("causal-conv1d"),
        "kernels": status(), "scan_impls": _scan_impls(device), "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        out.update(device_name=cpu_model())
    from ..ops.selective_scan import _resolve_impl

    out["auto_impl"] = {dt: _resolve_impl("auto", device, getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    return out


def run_pytest(timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` on the repository's tests, in a subprocess; the summary line and exit code."""
    import importlib.util

    tests = REPO / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"no tests/ next to the package ({tests})"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed in this environment"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout_s, 10))
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"pytest -m gpu did not finish in {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else (proc.stderr.strip().splitlines() or [""])[-1]
    # exit code 5: no test selected (all deselected), which pytest counts as a failure
    ok = proc.returncode == 0
    return {"status": "ok" if ok else "fail", "returncode": proc.returncode, "summary": summary,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": "\n".join(lines[-30:]) if not ok else ""}


def parity(device: torch.device, impls: list[str], shapes: dict[str, dict[str, int]], batch: int) -> list[dict]:
    """Every impl vs the float64 reference on the same (rounded) inputs: worst scaled error per tensor."""
    torch.manual_seed(0)
    rows = []
    for shape, s in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).split(".")[-1]
            for reverse in (False, True):
                inputs = mixer_like_inputs(batch, s["E"], s["L"], s["N"], device, dtype)
                gout = torch.randn(batch, s["E"], s["L"], device=device).to(dtype)
                ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
                ref = selective_scan(**ref_leaves, delta_softplus=True, impl="ref", reverse=reverse)
                ref.backward(gout.double())
                for impl in impls:
                    row: dict[str, Any] = dict(shape=shape, dtype=dname, reverse=reverse, impl=impl, batch=batch, **s)
                    rows.append(row)
                    try:
                        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
                        out = selective_scan(**leaves, delta_softplus=True, impl=impl, reverse=reverse)
                        out.backward(gout)
                        errs = {"out": _scaled_err(out, ref)}
                        errs.update({f"d{k}": _scaled_err(leaves[k].grad, ref_leaves[k].grad) for k in leaves})
                    except Exception as exc:
                        row.update(_error(exc))
                        continue
                    worst = max(errs, key=errs.get)
                    ok = all(math.isfinite(e) for e in errs.values()) and errs[worst] <= TOLERANCE[dname]
                    row.update(status="ok" if ok else "FAIL", worst=worst, worst_err=errs[worst], errors=errs)
    return rows


def _scaled_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() or 1.0
    return (x.double() - ref).abs().max().item() / scale


def _copy_peak(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=2, device=device)["copy"]
    return 2 * nbytes / statistics.median(t) / 1e9  # read + write


def scan_timing(device: torch.device, impls: list[str], shapes: dict[str, dict[str, int]], batch: int,
                repeats: int, quick: bool) -> dict[str, Any]:
    """Forward+backward ms of the reference and each impl (interleaved medians), GB/s and % of copy peak."""
    peak = _copy_peak(device, (16 if quick else 1024) * 2**20, max(repeats, 5))
    rows = []
    for shape, s in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            inputs = mixer_like_inputs(batch, s["E"], s["L"], s["N"], device, dtype)
            gout = torch.randn(batch, s["E"], s["L"], device=device).to(dtype)
            rec = dict(shape=shape, dtype=str(dtype).split(".")[-1], batch=batch, **s)
            fns: dict[str, Callable[[], None]] = {}
            for impl in ["ref", *impls]:
                def step(impl: str = impl) -> None:
                    for t in inputs.values():
                        t.grad = None
                    selective_scan(**inputs, delta_softplus=True, impl=impl).backward(gout)

                try:  # one untimed call first: an impl that fails is recorded and left out of the timing
                    step()
                except Exception as exc:
                    rows.append(dict(rec, impl=impl, **_error(exc)))
                    continue
                fns[impl] = step
            times = time_interleaved(fns, repeats, warmup=1, device=device)
            nbytes = min_scan_bytes(batch, s["E"], s["L"], s["N"], torch.finfo(dtype).bits // 8)
            ref_ms = statistics.median(times["ref"]) * 1e3 if "ref" in times else None
            for name, ts in times.items():
                ms = statistics.median(ts) * 1e3
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(rec, impl=name, status="ok", ms_fwd_bwd=ms, speedup_vs_ref=ref_ms / ms if ref_ms else None,
                                 gbytes_per_s=gbs, fraction_of_copy_peak=gbs / peak))
    return {"status": "ok", "copy_peak_gbytes_per_s": peak, "rows": rows}


def _step_record(name: str, device: torch.device, batch: int, img: int, repeats: int, quick: bool,
                 **kwargs: Any) -> dict[str, Any]:
    rec: dict[str, Any] = dict(model=name, batch=batch, img_size=img, amp="bfloat16", **kwargs)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = make_model(name, quick, device, **kwargs)
        step = train_step_fn(model, batch, img, device, torch.bfloat16)
        ts = time_interleaved({"s": step}, repeats, warmup=3, device=device)["s"]
        rec.update(status="ok", ms=statistics.median(ts) * 1e3, images_per_s=batch / statistics.median(ts),
                   peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None)
        del model, step
    except Exception as exc:
        rec.update(_error(exc))
    return rec


def train_step(device: torch.device, impls: list[str], batch: int, repeats: int, quick: bool) -> dict[str, Any]:
    """Vim-S with each fast scan present (auto's choice first) and DeiT-S: one bf16 AdamW step each."""
    img = 32 if quick else 224
    fast = [i for i in impls if i in ("mamba_ssm", "triton")] or impls[:1]
    rows = [_step_record("vim_small_patch16_224", device, batch, img, repeats, quick, scan_impl=i) for i in fast]
    rows.append(_step_record("deit_small_patch16_224", device, batch, img, repeats, quick))
    deit = rows[-1].get("images_per_s")
    for r in rows[:-1]:
        if deit and r.get("images_per_s"):
            r["vs_deit_s"] = r["images_per_s"] / deit
    return {"status": "ok", "rows": rows}


def slws(device: torch.device, batch: int, repeats: int, quick: bool) -> dict[str, Any]:
    return {"status": "ok", **bench_train(device, quick, repeats, batch, torch.bfloat16)}


# -- report ---------------------------------------------------------------------------------------------
def run_check(device: torch.device, *, quick: bool = False, budget_s: float = 420.0,
              skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the sections in order, each guarded; a section that would start past the budget is skipped."""
    t0 = time.perf_counter()
    rep: dict[str, Any] = {"meta": {"date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": quick,
                                    "device": str(device), "budget_s": budget_s}}
    shapes = QUICK_SHAPES if quick else SHAPES
    repeats = 3 if quick else 10
    impls = _scan_impls(device)
    plan: dict[str, Callable[[], Any]] = {
        "environment": lambda: environment(device),
        "pytest": lambda: run_pytest(min(240.0, budget_s - (time.perf_counter() - t0))),
        "parity": lambda: {"status": "ok", "rows": parity(device, impls, shapes, 2 if quick else 8)},
        "scan_timing": lambda: scan_timing(device, impls, shapes, 2 if quick else 32, repeats, quick),
        "train_step": lambda: train_step(device, impls, 2 if quick else 64, repeats, quick),
        "slws": lambda: slws(device, 2 if quick else 64, repeats, quick),
    }
    for name, fn in plan.items():
        elapsed = time.perf_counter() - t0
        if name in skip:
            rep[name] = {"status": "skipped", "reason": "--skip"}
            continue
        if elapsed > budget_s and name != "environment":  # the header of the report always runs
            rep[name] = {"status": "skipped", "reason": f"time budget ({budget_s:.0f} s) spent"}
            continue
        print(f"[gpu-check] {name} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        s0 = time.perf_counter()
        try:
            rep[name] = fn()
        except Exception as exc:  # recorded; the next section still runs
            rep[name] = _error(exc)
        rep[name]["seconds"] = round(time.perf_counter() - s0, 1)
    rep["meta"]["seconds"] = time.perf_counter() - t0
    return rep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shufflemamba doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run the GPU check and write its report")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny smoke run, with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the check itself")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS[1:], help="sections to leave out")
    p.add_argument("--json", default="runs/gpu-check.json", help="where to write the report as JSON")
    return p


def describe_environment(env: dict[str, Any]) -> str:
    """``environment()`` as aligned ``name: value`` lines (nested mappings as ``name.key``)."""
    flat: list[tuple[str, Any]] = []
    for key, value in env.items():
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            flat.append((key, value))
    width = max(len(k) for k, _ in flat)
    return "\n".join(f"{k.ljust(width)}  {_shown(k, v)}" for k, v in flat)


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "none (a CPU build of torch)" if key == "cuda" else "not installed"
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def main(argv: list[str] | None = None) -> int:
    """``shufflemamba doctor [--gpu]``; returns the exit code (0 also when there is no GPU)."""
    args = build_parser().parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    if not args.gpu:  # plain `doctor`: what this machine has
        device = torch.device("cuda" if torch.cuda.is_available() and args.device == "cuda" else "cpu")
        print(describe_environment(environment(device)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing to check")
        return 0
    device = torch.device(args.device)
    rep = run_check(device, quick=args.quick, budget_s=args.budget_s, skip=tuple(args.skip))
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    print(gpu_check_markdown(rep))
    print(f"[gpu-check] wrote {json_path}", file=sys.stderr)
    return 0
