"""Selective-scan benchmark on the CPU: forward + backward of every implementation, side by side.

    python benchmarks/bench_scan.py --threads 2 --json benchmarks/results/scan-cpu.json \\
        --markdown benchmarks/results/scan-cpu.md

Prints a table (with the ratio to a plain unbind loop with autograd) and optionally writes the
rows as JSON and a markdown section ready for docs/benchmarks.md. Not a test: timings depend on
the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import shufflemamba  # noqa: F401  (applies the torchvision shim before anything imports timm)
from shufflemamba.bench.report import cpu_model, scan_markdown
from shufflemamba.bench.scan import DEFAULT_IMPLS, SCAN_SHAPES, ScanShape, bench_scan


def bench_cl(shapes, threads: int, repeat: int, warmup: int, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Rows like ``bench_scan``'s for the mixer's channel-last kernel (impl "cpu_cl"), forward
    direction and reverse, on the same inputs laid out (batch, L, E) as the mixer hands them over."""
    import statistics
    import time
    from dataclasses import asdict

    from shufflemamba.bench.scan import plain_inputs
    from shufflemamba.ops.cpu_scan import cpu_scan_available, selective_scan_cl

    if not cpu_scan_available():
        return []
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for shape in shapes:
            ins = plain_inputs(shape, dtype, seed)
            # (batch, E, L) -> (batch, L, E); B, C -> (batch, L, N)
            cl = [t.transpose(1, 2).contiguous() if t.dim() == 3 else t for t in ins]
            leaves = [t.requires_grad_() for t in cl]
            gout = torch.randn(shape.batch, shape.L, shape.E, generator=torch.Generator().manual_seed(seed + 1))
            gout = gout.to(dtype)
            for reverse in (False, True):
                def once(backward: bool) -> float:
                    for t in leaves:
                        t.grad = None
                    t0 = time.perf_counter()
                    if backward:
                        selective_scan_cl(*leaves, delta_softplus=True, reverse=reverse).backward(gout)
                    else:
                        with torch.no_grad():
                            selective_scan_cl(*leaves, delta_softplus=True, reverse=reverse)
                    return time.perf_counter() - t0

                for _ in range(warmup):
                    once(True)
                fwd = [once(False) for _ in range(repeat)]
                both = [once(True) for _ in range(repeat)]
                rows.append({**asdict(shape), "shape": shape.name, "impl": "cpu_cl_rev" if reverse else "cpu_cl",
                             "dtype": str(dtype).replace("torch.", ""), "threads": threads,
                             "fwd_ms": 1e3 * statistics.median(fwd), "fwd_bwd_ms": 1e3 * statistics.median(both),
                             "fwd_bwd_min_ms": 1e3 * min(both), "speedup": None})
    finally:
        torch.set_num_threads(old)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SCAN_SHAPES), help=f"named shapes: {', '.join(SCAN_SHAPES)}")
    p.add_argument("--shape", action="append", default=[], metavar="B,E,L,N", help="an extra custom shape")
    p.add_argument("--impls", nargs="+", default=[*DEFAULT_IMPLS, "cpu_cl"],
                   help="unbind, ref, torch, cpu, triton, cpu_cl (the mixer's channel-last kernel, both directions)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", type=Path, help="write the rows (and the environment) here")
    p.add_argument("--markdown", type=Path, help="write a markdown section here")
    args = p.parse_args(argv)

    unknown = [s for s in args.shapes if s not in SCAN_SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; known: {', '.join(SCAN_SHAPES)}")
    shapes = [SCAN_SHAPES[s] for s in args.shapes]
    for spec in args.shape:
        try:
            b, e, l, n = (int(v) for v in spec.split(","))
        except ValueError:
            p.error(f"--shape wants B,E,L,N (four integers), got {spec!r}")
        shapes.append(ScanShape(f"custom", b, e, l, n))

    impls = [i for i in args.impls if i != "cpu_cl"]  # cpu_cl has its own (batch, L, E) runner below
    rows = bench_scan(shapes, impls, threads=args.threads, repeat=args.repeat, warmup=args.warmup,
                      dtype=getattr(torch, args.dtype))  # fmt: skip
    if "cpu_cl" in args.impls:
        cl_rows = bench_cl(shapes, args.threads, args.repeat, args.warmup, getattr(torch, args.dtype))
        for row in cl_rows:  # ratio to the unbind loop of the same shape, when it ran
            base = next((r["fwd_bwd_ms"] for r in rows if r["impl"] == "unbind" and r["shape"] == row["shape"]), None)
            row["speedup"] = base / row["fwd_bwd_ms"] if base else None
        rows += cl_rows
    from shufflemamba.ops.cpu_scan import describe_vector_width

    env = {"cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
           "cpu_kernels": describe_vector_width()}
    command = "python benchmarks/bench_scan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = scan_markdown(rows)
    print(f"{env['cpu']}, torch {env['torch']}, {args.threads} threads, {args.dtype}, median of {args.repeat}")
    print(env["cpu_kernels"])
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "command": command, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            "## Selective scan (CPU)\n\n"
            f"Device: {env['cpu']}; torch {env['torch']}; {args.threads} threads; {args.dtype}; "
            f"forward + backward with D, z, delta_bias and softplus; median of {args.repeat} runs; "
            f"{env['cpu_kernels']}.\n\n"
            f"Command: `{command}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
