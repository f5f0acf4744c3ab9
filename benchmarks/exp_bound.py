"""How far faster exps could take the paper's pair: Vim-Ti against DeiT-Ti with the kernels' exps replaced
by a 2-operation stand-in (timing only: the Vim's outputs are then wrong).

    python benchmarks/exp_bound.py                      # the three rows of the pair, this CPU
    SHUFFLEMAMBA_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/exp_bound.py                  # as an AVX2-only CPU (make cpu-figures-avx2's caps)

Three builds of the CPU kernels time the same Vim-Ti, round-robin with timm's DeiT-Ti in one process
(shufflemamba.bench.paper_pair's rows and steps): the current kernels; "decay exp free", the state loops'
2^t (sm_vexp2, 11 vector operations on AVX2 with its clamp) as max(1 + t / 100, 0); "every exp free", also
e^x of the softplus, sigmoid and expm1 rows (sm_vexp_m) so replaced. No exp can cost less than the stand-in,
so a target the "every exp free" column misses is out of reach of any work on the exps, all else as it is.
x86 only (the stand-ins replace the explicit x86 vector functions, pointwise_x86.h).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.bench.paper_pair import DEIT, ROWS, VIM, _build, _step
from shufflemamba.bench.timing import time_interleaved
from shufflemamba.ops import cpu_library
from shufflemamba.ops.config import cpu_model
from shufflemamba.ops.cpu_scan import describe_vector_width
from shufflemamba.process import tune_malloc

from profile_train_step import kernels_at

HEADER = "pointwise_x86.h"
STAND_IN = "sm_vmax(sm_vfma({x}, sm_vset1(0.01f), sm_vset1(1.0f)), sm_vzero())"
# the first line of each function to replace, and its replacement (the original is kept under a new name)
DECAY = (r"static inline sm_vf sm_vexp2\(sm_vf t\) \{",
         "static inline sm_vf sm_vexp2(sm_vf t) { return " + STAND_IN.format(x="t") + "; }\n"
         "static inline sm_vf sm_vexp2_unused(sm_vf t) {")
ROWS_EXP = (r"SM_INLINE void sm_vexp_m\(sm_vf \*x, int M\) \{",
            "SM_INLINE void sm_vexp_m(sm_vf *x, int M) { SM_EACH(i, M) x[i] = " + STAND_IN.format(x="x[i]") + "; }\n"
            "SM_INLINE void sm_vexp_m_unused(sm_vf *x, int M) {")


def editor(*replacements: tuple[str, str]) -> Callable[[str, str], str]:
    def edit(name: str, text: str) -> str:
        if name != HEADER:
            return text
        for pattern, new in replacements:
            text, n = re.subn(pattern, lambda _: new, text, count=1)
            if n != 1:
                raise SystemExit(f"error: {HEADER} has no line matching {pattern!r}: update {Path(__file__).name}")
        return text

    return edit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", type=int, default=list(range(len(ROWS))),
                   help=f"which of the pair's rows, by index: {', '.join(f'{i} {m} {s} px' for i, (m, s, _) in enumerate(ROWS))}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not cpu_library.cpu_scan_available() or not cpu_library.state_loop_bits(cpu_library.library()):
        raise SystemExit(f"error: needs the compiled kernels' explicit x86 state loops; loaded: {describe_vector_width()}")
    tune_malloc()  # as the shufflemamba command and paper_pair time
    torch.set_num_threads(args.threads)
    libs = {"kernels": cpu_library.library(), "decay exp free": kernels_at(None, edit=editor(DECAY)),
            "every exp free": kernels_at(None, edit=editor(DECAY, ROWS_EXP))}
    device = torch.device("cpu")
    print(f"{cpu_model()}, {args.threads} threads; {describe_vector_width()}\n")
    print("| mode | px | batch | DeiT-Ti ms | " + " | ".join(f"Vim-Ti ms, {k}" for k in libs) + " | "
          + " | ".join(f"Vim vs DeiT, {k}" for k in libs) + " |")
    print("|---|---:|---:|---:|" + "---:|" * (2 * len(libs)))
    records = []
    try:
        for i in args.rows:
            mode, img, batch = ROWS[i]
            vim = _step(_build(VIM, img, False), mode, img, batch, device)

            def with_lib(lib):
                def run() -> None:
                    cpu_library.swap_library(lib)
                    vim()
                return run

            fns = {k: with_lib(lib) for k, lib in libs.items()}
            fns["deit"] = _step(_build(DEIT, img, False), mode, img, batch, device)
            times = time_interleaved(fns, args.repeats, warmup=1, device=device)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ratio = {k: statistics.median(d / v for v, d in zip(times[k], times["deit"])) for k in libs}
            records.append(dict(mode=mode, img_size=img, batch=batch, ms=ms, vim_vs_deit=ratio))
            print(f"| {mode} | {img} | {batch} | {ms['deit']:.1f} | " + " | ".join(f"{ms[k]:.1f}" for k in libs)
                  + " | " + " | ".join(f"{ratio[k]:.2f}x" for k in libs) + " |", flush=True)
    finally:
        cpu_library.swap_library(libs["kernels"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(cpu=cpu_model(), kernels=describe_vector_width(), threads=args.threads,
                                             rows=records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
