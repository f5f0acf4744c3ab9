"""Benchmark suite: selective-scan implementations, Vim training steps, SLWS overhead, GPU figures.

Everything runs side by side in one process; the results are written as JSON and printed as markdown::

    shufflemamba bench [--quick] [--device cpu|cuda] [--json PATH]
    python -m shufflemamba.bench ...            (the same)

``benchmarks/docs_section.py bench PATH`` puts the JSON's section into docs/benchmarks.md.

Measured, all as medians over interleaved repeats:

* selective scan forward+backward on Vim-Ti / Vim-S mixer shapes: the reference loop, our fast paths
  (``impl="cpu"``, ``impl="torch"``), the Triton kernels (CUDA only), and mambapy's parallel scan
  (optional peer; ``pip install mambapy``). Each forward is also checked against the reference.
* one training step (forward, loss, backward, AdamW) of vim_tiny / vim_small with SLWS off and at
  rate 0.5: images/s and the SLWS overhead ratio (target: at most 2%).
* the paper's pair: vim_tiny (24 blocks) vs deit_tiny (12 blocks), inference at 224 and 1024 px and
  training at 224 px, with multiply-adds per image and peak memory (``bench/paper_pair.py``).
* on a GPU: the Triton scan's achieved memory bandwidth as a fraction of a measured copy peak, and
  Vim-S vs timm's deit_small_patch16_224 training images/s at the same batch and precision.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..ops.selective_scan import selective_scan, selective_scan_ref
from .report import bench_markdown, cpu_model
from .scan import min_scan_bytes, mixer_like_inputs
from .timing import make_model, time_interleaved, train_step_fn
from .paper_pair import bench_paper_pair
from .vit import bench_vs_vit

# Mixer shapes: E = 2 * embed_dim, L = 196 patches + class token, N = d_state
SCAN_SHAPES = {"vim_ti": dict(E=384, L=197, N=16), "vim_s": dict(E=768, L=197, N=16)}
QUICK_SCAN_SHAPES = {"vim_ti": dict(E=32, L=17, N=4), "vim_s": dict(E=64, L=17, N=4)}


# -- helpers ----------------------------------------------------------------------------------------
def _mambapy_scan() -> Callable[..., Tensor] | None:
    """mambapy's parallel (Blelloch) scan wrapped to our signature, or None when mambapy is absent."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        # mambapy works in (batch, L, E[, N]); it materialises (batch, L, E, N) decays and inputs
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        dt = (F.softplus(delta) if delta_softplus else delta).transpose(1, 2)  # (b, L, E)
        x = u.transpose(1, 2)
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, E, N)
        BX = (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)  # (b, L, E, N)
        hs = pscan(dA, BX)
        y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)  # (b, L, E)
        if D is not None:
            y = y + D * x
        if z is not None:
            y = y * F.silu(z.transpose(1, 2))
        return y.transpose(1, 2)

    return scan


def _scan_impls(device: torch.device) -> dict[str, Callable[..., Tensor] | str]:
    """Name -> scan function, or a string saying why it is unavailable."""
    impls: dict[str, Callable[..., Tensor] | str] = {"reference": selective_scan_ref}
    for impl in ("cpu", "torch"):
        impls[impl] = lambda *a, _impl=impl, **k: selective_scan(*a, impl=_impl, **k)
    if device.type == "cuda":
        try:
            from shufflemamba.ops.triton_scan import selective_scan_triton, triton_available
        except ImportError as e:  # pragma: no cover
            impls["triton"] = f"unavailable ({e})"
        else:
            impls["triton"] = selective_scan_triton if triton_available("cuda") else "unavailable (no triton)"
    else:
        impls["triton"] = "unavailable (needs CUDA; the CPU interpreter is for tests only)"
    impls["mambapy"] = _mambapy_scan() or "unavailable (pip install mambapy)"
    return impls


# -- sections -----------------------------------------------------------------------------------------
def bench_scan(device: torch.device, quick: bool, repeats: int, batch: int,
               dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """Forward+backward of every scan implementation on each shape; one record per (shape, impl)."""
    impls = _scan_impls(device)
    records = []
    for shape_name, shp in (QUICK_SCAN_SHAPES if quick else SCAN_SHAPES).items():
        E, L, N = shp["E"], shp["L"], shp["N"]
        inputs = mixer_like_inputs(batch, E, L, N, device, dtype)
        gout = torch.randn(batch, E, L, device=device, dtype=dtype)
        with torch.no_grad():
            ref = selective_scan_ref(**inputs, delta_softplus=True).float()
        fns, base = {}, dict(shape=shape_name, batch=batch, E=E, L=L, N=N, dtype=str(dtype).replace("torch.", ""))
        for name, fn in impls.items():
            rec = dict(base, impl=name)
            records.append(rec)
            if isinstance(fn, str):
                rec.update(status=fn)
                continue
            try:
                with torch.no_grad():
                    out = fn(**inputs, delta_softplus=True)
                rec["max_abs_err_vs_ref"] = (out.float() - ref).abs().max().item()
            except Exception as e:  # a teammate's path not there yet, an unsupported device...
                rec.update(status=f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            rec["status"] = "ok"

            def step(fn=fn):
                for t in inputs.values():
                    t.grad = None
                fn(**inputs, delta_softplus=True).backward(gout)

            fns[name] = step
        times = time_interleaved(fns, repeats, warmup=1, device=device)
        ref_ms = statistics.median(times["reference"]) * 1e3 if "reference" in times else None
        nbytes = min_scan_bytes(batch, E, L, N, torch.finfo(dtype).bits // 8)
        for rec in records[-len(impls):]:
            if rec["impl"] in times:
                ms = statistics.median(times[rec["impl"]]) * 1e3
                rec.update(ms_fwd_bwd=ms, ms_all=[t * 1e3 for t in times[rec["impl"]]],
                           speedup_vs_ref=(ref_ms / ms) if ref_ms else None,
                           gbytes_per_s=nbytes / (ms * 1e-3) / 1e9)
    return records


def slws_ops_ms(model: torch.nn.Module, batch: int, img: int, device: torch.device, repeats: int) -> float:
    """Milliseconds of the work SLWS adds to one step if every block shuffled: per block a randperm, an
    argsort and gathers of hidden and residual, forward and back (4 gathers + their 4 backward scatters
    counted as 8). Timed in isolation: a steadier upper bound than subtracting two noisy step times."""
    depth = len(getattr(model, "layers", [])) or 1
    tokens = (img // 16) ** 2 + 1
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", 192)
    h = torch.randn(batch, tokens, dim, device=device)

    def ops() -> None:
        for _ in range(depth):
            perm = torch.randperm(tokens, device=device)
            inv = torch.argsort(perm)
            for _ in range(4):
                h.index_select(1, perm).index_select(1, inv)

    return statistics.median(time_interleaved({"ops": ops}, repeats, 1, device)["ops"]) * 1e3


def bench_train(device: torch.device, quick: bool, repeats: int, batch: int,
                amp: torch.dtype | None) -> dict[str, Any]:
    """Training-step images/s of vim_tiny / vim_small with SLWS off and at rate 0.5, interleaved."""
    img = 32 if quick else 224
    out: dict[str, Any] = {"batch": batch, "img_size": img, "amp": str(amp) if amp else None, "models": {}}
    for name in ("vim_tiny_patch16_224", "vim_small_patch16_224"):
        rec: dict[str, Any] = {}
        out["models"][name] = rec
        try:
            model = make_model(name, quick, device)
            if not hasattr(model, "set_slws"):
                raise TypeError(f"{type(model).__name__} has no set_slws")
        except Exception as e:
            rec["status"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            continue
        rec.update(slws_record(model, batch, img, device, amp, repeats))
        del model
    return out


def slws_record(model: torch.nn.Module, batch: int, img: int, device: torch.device, amp: torch.dtype | None,
                repeats: int) -> dict[str, Any]:
    """One model's training steps with SLWS off and at rate 0.5, interleaved: times, images/s, the
    overhead (as a ratio of medians and as the median of the pairs' ratios) and SLWS's own ops alone."""
    step = train_step_fn(model, batch, img, device, amp)

    def run(rate: float) -> None:
        model.set_slws(rate)
        step()

    times = time_interleaved({"off": lambda: run(0.0), "slws_0.5": lambda: run(0.5)}, repeats, 1, device)
    off, on = statistics.median(times["off"]), statistics.median(times["slws_0.5"])
    # the ratio of each interleaved pair is steadier than the ratio of medians on a busy machine
    paired = statistics.median(b / a for a, b in zip(times["off"], times["slws_0.5"]))
    shuffle_ms = slws_ops_ms(model, batch, img, device, repeats)
    return dict(status="ok", ms_off=off * 1e3, slws_ops_ms=shuffle_ms, slws_ops_fraction=shuffle_ms / (off * 1e3),
                ms_slws=on * 1e3, images_per_s_off=batch / off, images_per_s_slws=batch / on,
                slws_overhead=on / off - 1, slws_overhead_paired=paired - 1, repeats=repeats)


def bench_gpu(device: torch.device, quick: bool, repeats: int, scan_records: list[dict[str, Any]],
              batch: int) -> dict[str, Any]:
    """Copy-bandwidth peak, the Triton scan's fraction of it, and Vim-S vs DeiT-S training images/s."""
    out: dict[str, Any] = {}
    n = (64 if quick else 1024) * 2**20  # bytes
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, repeats=max(repeats, 5), warmup=2, device=device)
    peak = 2 * n / statistics.median(t["copy"]) / 1e9  # read + write
    out["copy_peak_gbytes_per_s"] = peak
    del src, dst
    out["scan_bandwidth"] = [
        dict(shape=r["shape"], gbytes_per_s=r["gbytes_per_s"], fraction_of_peak=r["gbytes_per_s"] / peak)
        for r in scan_records if r["impl"] == "triton" and r.get("status") == "ok"
    ]
    amp = torch.bfloat16
    res: dict[str, Any] = {"batch": batch, "amp": "bfloat16"}
    for name in ("vim_small_patch16_224", "deit_small_patch16_224"):
        try:
            if quick:
                import timm

                kw = dict(img_size=32, depth=2) if name.startswith("vim") else dict(img_size=32, depth=2)
                model = timm.create_model(name, num_classes=10, **kw).to(device)
            else:
                model = make_model(name, False, device)
            img = 32 if quick else 224
            step = train_step_fn(model, batch, img, device, amp)
            tt = time_interleaved({"s": step}, repeats, 2, device)["s"]
            res[name] = dict(status="ok", images_per_s=batch / statistics.median(tt))
            del model, step
        except Exception as e:
            res[name] = dict(status=f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    v, d = res["vim_small_patch16_224"], res["deit_small_patch16_224"]
    if v.get("status") == "ok" and d.get("status") == "ok":
        res["vim_over_deit"] = v["images_per_s"] / d["images_per_s"]
    out["train_vs_deit"] = res
    return out


# -- output ---------------------------------------------------------------------------------------------
def _meta(device: torch.device, quick: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": quick,
        "device": str(device), "device_name": cpu_model(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    else:  # which vector width the compiled CPU kernels run with, and why (cpu_scan's auto rule)
        from ..ops.cpu_scan import describe_vector_width

        meta["cpu_kernels"] = describe_vector_width()
        from ..ops.cpu_linear import describe_gemm

        meta["cpu_gemm"] = describe_gemm()
        # torch's own CPU kernels' ISA (ATEN_CPU_CAPABILITY can cap it: an AVX2-only CPU emulated whole)
        meta["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    for mod in ("triton", "mambapy", "timm"):
        try:
            meta[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            meta[mod] = None
    return meta


# -- entry point ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shufflemamba bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs in seconds")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default="runs/bench.json", help="where to write the results as JSON")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--scan-batch", type=int, default=None, help="batch of the scan benchmark")
    p.add_argument("--train-batch", type=int, default=None, help="batch of the training-step benchmark")
    p.add_argument("--skip", nargs="*", default=[], choices=["scan", "train", "vit", "pair", "gpu"], help="sections to skip")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns a process exit code."""
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}")
    for opt in ("repeats", "scan_batch", "train_batch"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")
    gpu = device.type == "cuda"
    repeats = args.repeats or (2 if args.quick else 7)
    scan_batch = args.scan_batch or (1 if args.quick else (8 if gpu else 2))
    train_batch = args.train_batch or (2 if args.quick else (64 if gpu else 4))

    res: dict[str, Any] = {"meta": _meta(device, args.quick)}
    res["meta"].update(repeats=repeats)
    if "scan" not in args.skip:
        print(f"[bench] selective scan on {device} ...", file=sys.stderr)
        res["scan"] = bench_scan(device, args.quick, repeats, scan_batch)
    else:
        res["scan"] = []
    if "train" not in args.skip:
        print("[bench] training steps, SLWS off vs 0.5 ...", file=sys.stderr)
        res["train"] = bench_train(device, args.quick, repeats, train_batch, torch.bfloat16 if gpu else None)
    else:
        res["train"] = {"batch": train_batch, "img_size": None, "amp": None, "models": {}}
    if "vit" not in args.skip:
        print("[bench] training steps, our Vim vs timm's ViT of the same size ...", file=sys.stderr)
        res["vit"] = bench_vs_vit(device, args.quick, repeats, torch.bfloat16 if gpu else None)
    if "pair" not in args.skip:
        print("[bench] the paper's pair: vim_tiny vs deit_tiny, inference and training ...", file=sys.stderr)
        res["pair"] = bench_paper_pair(device, args.quick, max(3, repeats // 2))
    if gpu and "gpu" not in args.skip:
        print("[bench] GPU bandwidth and Vim-S vs DeiT-S ...", file=sys.stderr)
        res["gpu"] = bench_gpu(device, args.quick, repeats, res["scan"], train_batch)
    else:
        res["gpu"] = {"skipped": "no CUDA device" if not gpu else "--skip gpu"}

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2) + "\n")
    print(bench_markdown(res))
    print(f"[bench] wrote {json_path}", file=sys.stderr)
    return 0

