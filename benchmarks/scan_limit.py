"""How far the CPU selective scan is from its arithmetic limit (issue 12), on this CPU.

The limit is what the scan's arithmetic alone would cost at this CPU's measured peak rates, with
memory traffic, loop overhead and synchronisation taken as free:

    limit = element-steps x (exps per element-step / exp rate + other ops per element-step / FMA rate)

* element-steps = batch x E x L x N (one state of one channel at one time step);
* the exp rate is that of the exp the kernels' decays use (they are computed as 2^(d A log2 e)):
  on AVX-512 the explicit-vector ``sm_vexp2`` of ``csrc/scan_steps.h`` (vreduceps, a polynomial,
  vscalefps), elsewhere the inlined ``sm_exp2f`` (common.h) in an ``omp simd`` loop; the FMA rate
  that of FMAs on the widest vectors the build has (AVX-512, AVX2, NEON) with independent
  accumulators, both measured here by ``benchmarks/csrc/cpu_peak.c`` built with the kernels' flags
  (``-march=native``), on all ``--threads`` threads;
* op counts are read off the channel-last kernels (``mixer_cl.c``), every multiply, add or FMA
  counted as one op (they share the same vector ports on current x86 cores); the per-channel work
  of each step (softplus, the gate, their derivatives) is spread over the N states.

The measured time is forward + backward of ``selective_scan_cl`` (the kernel the Vim mixer runs)
at the Vim-Ti shape, in the same process: ``--repeat`` rounds of peak rates then scan, the best of
each (see :func:`measure`).

    python benchmarks/scan_limit.py --threads 2 --json benchmarks/results/scan-limit-<cpu>.json

``--isa avx2`` (x86) builds the peak rates and the kernels without AVX-512 (``-mno-avx512f``, the
SHUFFLEMAMBA_CPU_ISA setting of ``cpu_scan``): an AVX2-only CPU's figures, on an AVX-512 machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import shufflemamba  # noqa: F401  (torchvision shim)
from docs_section import write_marked_section
from shufflemamba.bench.report import cpu_model, machine_tag
from shufflemamba.ops import config as ops_config
from shufflemamba.ops import cpu_library, cpu_scan

HERE = Path(__file__).resolve().parent
KERNEL_SRC = HERE.parent / "src" / "shufflemamba" / "ops" / "csrc"

# Per element-step (b, e, t, n) of the channel-last kernels, read off mixer_cl.c:
#  forward  : a = exp(d*A); h = a*h + (d*u)*B; y += C*h                      -> 1 exp, 4 ops
#  backward : pass 1 recomputes the states (h, a stored; y is not rebuilt: the forward saved
#             y + D u), dC += gy*h                                          -> 1 exp, 4 ops
#             pass 2: g = gy*C + a'*g; ga = g*h*a; dd += ga*A; dA += ga*d;
#                     dB += g*(d*u) (lane sum); sgB += g*B                 -> 8 ops
# Per channel-step (b, e, t), spread over the N states (approximate): forward softplus (one exp,
# a division and a short polynomial) and the gate's sigmoid (one exp, one division); backward
# softplus' (expm1, counted as an exp) and sigmoid(z) (one exp), with their products.
OPS = {
    "forward": {"exp": 1.0, "ops": 4.0, "exp_per_channel": 2.0, "ops_per_channel": 20.0},
    "backward": {"exp": 1.0, "ops": 12.0, "exp_per_channel": 2.0, "ops_per_channel": 20.0},
}
VIM_TI = {"batch": 32, "E": 384, "L": 197, "N": 16}


def build_peak(vector_width: int | None) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("error: no C compiler (cc/gcc) found")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    # the kernels' own flags (with the width: -mprefer-vector-width and SM_VECTOR_BITS)
    flags = cpu_library.compile_flags(str(vector_width) if vector_width and x86 else None)
    out = Path(tempfile.mkdtemp()) / "cpu_peak.so"
    cmd = [cc, *flags, f"-I{KERNEL_SRC}", "-o", str(out), str(HERE / "csrc" / "cpu_peak.c"), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: building cpu_peak.c failed: {res.stderr.strip()}")
    lib = ctypes.CDLL(str(out))
    for name in ("fma_rate", "exp_rate"):
        getattr(lib, name).argtypes = [ctypes.c_int64, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_double
    lib.exp_path.restype = ctypes.c_int
    lib.fma_bits.restype = ctypes.c_int
    lib.fma_isa.restype = ctypes.c_char_p
    return lib


def limit_ms(shape: dict[str, int], rates: dict[str, float]) -> dict[str, float]:
    steps = shape["batch"] * shape["E"] * shape["L"] * shape["N"]
    out = {}
    for phase, c in OPS.items():
        exps = c["exp"] + c["exp_per_channel"] / shape["N"]
        ops = c["ops"] + c["ops_per_channel"] / shape["N"]
        out[phase] = 1e3 * steps * (exps / rates["exp_per_s"] + ops / rates["fma_per_s"])
    out["total"] = out["forward"] + out["backward"]
    return out


def scan_timer(shape: dict[str, int], threads: int):
    """A function timing one forward (``backward=False``) or forward + backward of ``selective_scan_cl``
    at ``shape``, in seconds."""
    from shufflemamba.ops.cpu_scan import cpu_scan_available, selective_scan_cl

    if not cpu_scan_available():
        raise SystemExit("error: the compiled CPU scan is not available here (see the warning above)")
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    b, e, l, n = shape["batch"], shape["E"], shape["L"], shape["N"]
    u, delta, z = (torch.randn(b, l, e, generator=g) for _ in range(3))
    bm, cm = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    a = -torch.rand(e, n, generator=g) * 4 - 0.5
    d, bias = torch.randn(e, generator=g), torch.randn(e, generator=g) * 0.1 - 3
    leaves = [t.requires_grad_() for t in (u, delta, a, bm, cm, d, z, bias)]
    gout = torch.randn(b, l, e, generator=g)

    def once(backward: bool) -> float:
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        if backward:
            selective_scan_cl(*leaves, delta_softplus=True).backward(gout)
        else:
            with torch.no_grad():
                selective_scan_cl(*leaves, delta_softplus=True)
        return time.perf_counter() - t0

    return once


def measure(lib: ctypes.CDLL, shape: dict[str, int], threads: int, repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    """(peak rates, scan ms), measured in turn ``repeat`` times: the peaks are the best rounds' rates and
    the scan's times its best rounds'. On a shared 2-core VM a neighbour can take a core for seconds
    (the FMA peak once read half its value, the scan 30% slower minutes apart): the best of rounds taken
    in turn is each side unhindered, where medians of two separate phases each saw a different machine."""
    once = scan_timer(shape, threads)
    lib.fma_rate(2_000_000, threads), lib.exp_rate(200_000, threads), once(True)  # warm up clocks, threads, caches
    fma, exp, fwd, both = [], [], [], []
    for _ in range(repeat):
        fma.append(lib.fma_rate(20_000_000, threads))
        exp.append(lib.exp_rate(2_000_000, threads))
        fwd.append(once(False))
        both.append(once(True))
    rates = {"fma_per_s": max(fma), "exp_per_s": max(exp)}
    return rates, {"forward": 1e3 * min(fwd), "total": 1e3 * min(both), "backward": 1e3 * (min(both) - min(fwd))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--vector-width", type=int, choices=[256, 512], default=None,
                   help="x86: vector width of the peak-rate build (default: the loaded kernels' width)")
    p.add_argument("--isa", choices=["native", "avx2"], default=None,
                   help="x86: avx2 builds the peak rates and the kernels without AVX-512 (SHUFFLEMAMBA_CPU_ISA)")
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--docs", type=Path, help="write a marked section into this markdown file (docs/benchmarks.md)")
    args = p.parse_args(argv)

    if args.isa:  # before the kernels load: they and the peak build read it
        os.environ[ops_config.ISA_ENV] = args.isa
    try:
        capped = bool(ops_config.isa_flags())
    except ValueError as exc:  # a bad SHUFFLEMAMBA_CPU_ISA
        raise SystemExit(f"error: {exc}") from None
    if args.vector_width is None:
        args.vector_width = (cpu_scan.vector_width_info() or {}).get("width")
    peak = build_peak(args.vector_width)
    rates, measured = measure(peak, VIM_TI, args.threads, args.repeat)
    exp_name = f"sm_vexp2, {peak.exp_path()}-bit" if peak.exp_path() else "sm_exp2f"
    fma_name = f"{peak.fma_bits()}-bit {peak.fma_isa().decode()}"
    limit = limit_ms(VIM_TI, rates)
    kernels = cpu_scan.describe_vector_width() if hasattr(cpu_scan, "describe_vector_width") else ""
    cpu = cpu_model() + (" (AVX-512 off: -mno-avx512f)" if capped else "")
    shape = f"({VIM_TI['batch']}, {VIM_TI['E']}, {VIM_TI['L']}, {VIM_TI['N']})"
    lines = [
        f"{cpu}, {args.threads} threads, torch {torch.__version__}; peak-rate build {f'-mprefer-vector-width={args.vector_width}' if args.vector_width else 'without a width flag'}"
        f"{' -mno-avx512f' if capped else ''}; {kernels}",
        f"measured peak: {rates['fma_per_s'] / 1e9:.1f} G FMA/s ({fma_name}), {rates['exp_per_s'] / 1e9:.2f} G exp/s ({exp_name}) "
        f"({rates['fma_per_s'] / rates['exp_per_s']:.1f} FMAs per exp)",
        "",
        f"| selective_scan_cl at Vim-Ti {shape}, float32 | arithmetic limit ms | measured ms | measured / limit |",
        "|---|---:|---:|---:|",
    ]
    for phase in ("forward", "backward", "total"):
        label = "forward + backward" if phase == "total" else phase
        lines.append(f"| {label} | {limit[phase]:.1f} | {measured[phase]:.1f} | {measured[phase] / limit[phase]:.2f}x |")
    table = "\n".join(lines)
    print(table)
    command = "python benchmarks/scan_limit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "torch": torch.__version__,
                                         "kernels": kernels, "rates": rates, "fma": fma_name, "exp": exp_name, "ops": OPS, "shape": VIM_TI,
                                         "limit_ms": limit, "measured_ms": measured, "command": command}, indent=2))
    if args.docs:
        section = (f"### Scan vs its arithmetic limit ({cpu}, {fma_name} FMAs)\n\nCommand: `{command}` (derivation: the script's "
                   f"docstring and the paragraph below this section).\n\n{table}\n\n")
        # one section per CPU model and vector ISA: AVX2-only and AVX-512 CPUs of one model name (AMD
        # EPYC Zen 3 and Zen 4) and a run with AVX-512 switched off do not overwrite each other
        tag = machine_tag(cpu_model()) + ("-avx2" if peak.fma_bits() == 256 and "AVX2" in fma_name else "")
        write_marked_section(args.docs, section, f"<!-- scan-limit:{tag}:begin -->", f"<!-- scan-limit:{tag}:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
