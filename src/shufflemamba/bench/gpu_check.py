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

It writes one JSON report and prints it as markdown (``benchmarks/docs_section.py gpu-check PATH`` puts
that section into docs/benchmarks.md; ``make gpu-check`` does both). ``shufflemamba doctor`` without ``--gpu`` prints
the environment section only. ``--device cpu --quick`` runs every section on tiny sizes on the CPU:
that is how the tests check this module on machines without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..ops.selective_scan import selective_scan
from .boxes import TIME_BOX, error_row, expired
from .environment import describe_environment, environment, scan_impls
from .report import gpu_check_markdown
from .scan import min_scan_bytes, mixer_like_inputs
from .short_train import short_train
from .suite import slws_record
from .timing import make_model, time_interleaved, train_step_fn

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
REPO = Path(__file__).resolve().parents[3]  # src/shufflemamba/bench/gpu_check.py -> repository root
SHAPES = {"vim_ti": dict(E=384, L=197, N=16), "vim_s": dict(E=768, L=197, N=16)}
QUICK_SHAPES = {"vim_ti": dict(E=16, L=9, N=4), "vim_s": dict(E=24, L=9, N=4)}
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # max |err| / max |reference|, per tensor
SECTIONS = ("environment", "pytest", "parity", "scan_timing", "train_step", "slws", "short_train")
# each section's share of the budget left when it starts (relative to the sections after it)
SHARES = {"pytest": 0.22, "parity": 0.12, "scan_timing": 0.14, "train_step": 0.16, "slws": 0.12, "short_train": 0.24}


# -- sections -------------------------------------------------------------------------------------------
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


def parity(device: torch.device, impls: list[str], shapes: dict[str, dict[str, int]], batch: int,
           deadline: float | None = None, rows: list | None = None) -> list[dict]:
    """Every impl vs the float64 reference on the same (rounded) inputs: worst scaled error per tensor."""

    torch.manual_seed(0)
    rows = [] if rows is None else rows
    for shape, s in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).split(".")[-1]
            for reverse in (False, True):
                rec = dict(shape=shape, dtype=dname, reverse=reverse, batch=batch, **s)
                if expired(deadline):
                    rows.extend(dict(rec, impl=impl, **TIME_BOX) for impl in impls)
                    continue
                try:
                    inputs = mixer_like_inputs(batch, s["E"], s["L"], s["N"], device, dtype)
                    gout = torch.randn(batch, s["E"], s["L"], device=device).to(dtype)
                    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
                    ref = selective_scan(**ref_leaves, delta_softplus=True, impl="ref", reverse=reverse)
                    ref.backward(gout.double())
                except Exception as exc:  # e.g. out of memory: this shape's rows say so
                    rows.extend(dict(rec, impl=impl, **error_row(exc)) for impl in impls)
                    continue
                for impl in impls:
                    row: dict[str, Any] = dict(rec, impl=impl)
                    if expired(deadline):
                        rows.append(dict(row, **TIME_BOX))
                        continue
                    try:
                        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
                        out = selective_scan(**leaves, delta_softplus=True, impl=impl, reverse=reverse)
                        out.backward(gout)
                        errs = {"out": _scaled_err(out, ref)}
                        errs.update({f"d{k}": _scaled_err(leaves[k].grad, ref_leaves[k].grad) for k in leaves})
                    except Exception as exc:
                        rows.append(dict(row, **error_row(exc)))
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

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=2, device=device)["copy"]
    return 2 * nbytes / statistics.median(t) / 1e9  # read + write


def scan_timing(device: torch.device, impls: list[str], shapes: dict[str, dict[str, int]], batch: int,
                repeats: int, quick: bool, deadline: float | None = None, rows: list | None = None) -> dict[str, Any]:
    """Forward+backward ms of the reference and each impl (interleaved medians), GB/s and % of copy peak."""

    peak = _copy_peak(device, (16 if quick else 1024) * 2**20, max(repeats, 5))
    rows = [] if rows is None else rows
    for shape, s in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            rec = dict(shape=shape, dtype=str(dtype).split(".")[-1], batch=batch, **s)
            if expired(deadline):
                rows.extend(dict(rec, impl=impl, **TIME_BOX) for impl in ["ref", *impls])
                continue
            try:
                inputs = mixer_like_inputs(batch, s["E"], s["L"], s["N"], device, dtype)
                gout = torch.randn(batch, s["E"], s["L"], device=device).to(dtype)
            except Exception as exc:
                rows.extend(dict(rec, impl=impl, **error_row(exc)) for impl in ["ref", *impls])
                continue
            fns: dict[str, Callable[[], None]] = {}
            for impl in ["ref", *impls]:
                def step(impl: str = impl) -> None:
                    for t in inputs.values():
                        t.grad = None
                    selective_scan(**inputs, delta_softplus=True, impl=impl).backward(gout)

                if expired(deadline):
                    rows.append(dict(rec, impl=impl, **TIME_BOX))
                    continue
                try:  # one untimed call first (Triton compiles here): a failing impl is left out
                    step()
                except Exception as exc:
                    rows.append(dict(rec, impl=impl, **error_row(exc)))
                    continue
                fns[impl] = step
            try:
                times = time_interleaved(fns, repeats, warmup=1, device=device)
            except Exception as exc:
                rows.extend(dict(rec, impl=impl, **error_row(exc)) for impl in fns)
                continue
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
        rec.update(error_row(exc))
    return rec


def train_step(device: torch.device, impls: list[str], batch: int, repeats: int, quick: bool,
               deadline: float | None = None, rows: list | None = None) -> dict[str, Any]:
    """Vim-S with each fast scan present (auto's choice first) and DeiT-S: one bf16 AdamW step each."""
    img = 32 if quick else 224
    fast = [i for i in impls if i in ("mamba_ssm", "triton")] or impls[:1]
    rows = [] if rows is None else rows
    plan = [("deit_small_patch16_224", {}), *(("vim_small_patch16_224", {"scan_impl": i}) for i in fast)]
    for name, kw in plan:  # DeiT-S first: the comparison every Vim-S row needs
        if expired(deadline):
            rows.append(dict(model=name, batch=batch, **kw, **TIME_BOX))
            continue
        rows.append(_step_record(name, device, batch, img, repeats, quick, **kw))
    deit = rows[0].get("images_per_s")
    for r in rows[1:]:
        if deit and r.get("images_per_s"):
            r["vs_deit_s"] = r["images_per_s"] / deit
    return {"status": "ok", "rows": rows}


def slws(device: torch.device, batch: int, repeats: int, quick: bool, deadline: float | None = None,
         rows: list | None = None) -> dict[str, Any]:
    """SLWS overhead at rate 0.5, as ``shufflemamba bench`` measures it, one model at a time: a model
    that fails or meets the end of the time box is recorded as such, and the others still count."""

    img = 32 if quick else 224
    rows = [] if rows is None else rows
    for name in ("vim_tiny_patch16_224", "vim_small_patch16_224"):
        rec: dict[str, Any] = {"model": name}
        if expired(deadline):
            rows.append(dict(rec, **TIME_BOX))
            continue
        try:
            model = make_model(name, quick, device)
            rec.update(slws_record(model, batch, img, device, torch.bfloat16, repeats))
            del model
        except Exception as exc:
            rec.update(error_row(exc))
        rows.append(rec)
    return {"status": "ok", "batch": batch, "img_size": img, "amp": "bfloat16",
            "models": {r["model"]: r for r in rows}}


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
        res = dict(error_row(exc), rows=list(rows))
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
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                         os.environ.get("PYTHONPATH")])))
        if device.type == "cuda":  # nothing on a GPU needs the CPU kernels: never build them here
            env["SHUFFLEMAMBA_NO_COMPILE"] = "1"
        code = "import sys; from shufflemamba.bench.gpu_check import _child_main; _child_main(sys.argv[1])"
        rc, _, stderr = _run_group([sys.executable, "-c", code, paths["spec"]], box_s, env=env)
        if Path(paths["result"]).exists():
            return json.loads(Path(paths["result"]).read_text())
        rows = json.loads(Path(paths["rows"]).read_text()) if Path(paths["rows"]).exists() else []
        why = (f"killed at the end of its {box_s:.0f} s time box" if rc is None
               else f"child process exited {rc}: {(stderr.strip().splitlines() or [''])[-1][:300]}")
        return {"status": "error", "error": why, "rows": rows}


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
        rep["environment"] = rep.get("environment") or error_row(exc)
        impls = scan_impls(device, with_mamba_ssm=False)  # what needs no code of others to decide
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
            rep[name] = error_row(exc)
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
    p.add_argument("--json", default="runs/gpu-check.json", help="where to write the report as JSON")
    return p


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
    rep = run_check(device, quick=args.quick, budget_s=args.budget_s, skip=tuple(args.skip),
                    isolate={"auto": None, "yes": True, "no": False}[args.isolate])
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=1, default=str) + "\n")
    print(gpu_check_markdown(rep))
    print(f"[gpu-check] wrote {json_path}", file=sys.stderr)
    return 0
