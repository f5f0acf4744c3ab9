"""A/B of one of the CPU path's switches: whole training steps with the switch on and off, interleaved
step by step in one process (a machine's drift hits both alike), timm's ViT of the same size alongside.

    python benchmarks/ab_switch.py PatchEmbed.MATMUL_MAX --off 0       # a class attribute, its off value
    python benchmarks/ab_switch.py PatchEmbed.MATMUL_MAX --off 0 --setup "D 192" --pairs 20

Switches: ``PatchEmbed.MATMUL_MAX`` (on: its value; off: False unless ``--off`` says otherwise). The
kernels have no switches: A/B them with build defines, ``benchmarks/profile_train_step.py
--kernels-flags``. Setups: the
ones of ``shufflemamba bench``'s Vim / ViT comparison (``shufflemamba.bench.vit.SETUPS``), by name prefix. Prints the
medians and the median of the pairs' ratios (off time / on time: above 1, the switch pays). Run it as
the ``shufflemamba`` command runs (its malloc settings; set ``GOMP_SPINCOUNT=30000`` on an idle machine
to match its OpenMP choice) and with nothing else running.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.bench import vit as bench_vit
from shufflemamba.process import tune_malloc
from shufflemamba.bench.timing import train_step_fn
from shufflemamba.models import PatchEmbed

SWITCHES = ("PatchEmbed.MATMUL_MAX",)


def _target(name: str) -> tuple[object, str]:
    if name not in SWITCHES:
        raise SystemExit(f"error: unknown switch {name!r}; switches: {', '.join(SWITCHES)}")
    return PatchEmbed, name.rpartition(".")[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("switch")
    p.add_argument("--off", type=float, help="the switch's off value (default False)")
    p.add_argument("--setup", default="demo (", help="bench_vit setup name prefix")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny batch and 2 pairs: a smoke test")
    args = p.parse_args(argv)
    obj, attr = _target(args.switch)
    names = [k for k in bench_vit.SETUPS if k.startswith(args.setup)]
    if not names:
        raise SystemExit(f"error: no setup starts with {args.setup!r}; setups: {', '.join(bench_vit.SETUPS)}")
    on = getattr(obj, attr)
    off = False if args.off is None else type(on)(args.off)
    tune_malloc()
    torch.set_num_threads(args.threads)
    setup = bench_vit.SETUPS[names[0]]
    vim, vit = bench_vit.vim_and_vit(setup, args.quick)
    img, chans = setup["shared"]["img_size"], setup["shared"]["in_chans"]
    batch = 4 if args.quick else setup["batch"]
    cpu = torch.device("cpu")
    steps = {k: train_step_fn(m, batch, img, cpu, None, chans) for k, m in (("vim", vim), ("vit", vit))}

    def run(value: object) -> None:
        setattr(obj, attr, value)
        steps["vim"]()

    try:
        for value in (on, off, on, off):
            run(value)  # warm-up: kernels built, allocator settled
        steps["vit"]()
        times: dict[str, list[float]] = {"on": [], "off": [], "vit": []}
        for _ in range(2 if args.quick else args.pairs):
            for key, fn in (("on", lambda: run(on)), ("off", lambda: run(off)), ("vit", steps["vit"])):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    finally:
        setattr(obj, attr, on)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = statistics.median(b / a for a, b in zip(times["on"], times["off"]))
    vit_on = statistics.median(b / a for a, b in zip(times["on"], times["vit"]))
    print(f"{names[0]}, batch {batch}, {len(times['on'])} rounds: on {med['on']:.1f} ms, off {med['off']:.1f} ms, "
          f"ViT {med['vit']:.1f} ms; off / on (median of pairs) {ratio:.3f}x; Vim (on) / ViT {vit_on:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
