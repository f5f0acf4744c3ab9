"""Profile one CPU training step (forward + backward + AdamW) of Vim models.

    python benchmarks/profile_train_step.py --threads 2 --models demo16 demo study tiny224 --top 15

Models: ``demo16`` (the demo as configs/demo.yaml has it: 16 px, 17 tokens), ``demo`` (the demo's
model before 2026-12-01: 28 px, 50 tokens), ``study``, ``tiny224`` (Vim-Ti at 224 px, batch 8, as the paper's
pair times it), ``d192``, and ``tiny1024`` (Vim-Ti at 1024 px, batch 1; only when named).
    python benchmarks/profile_train_step.py --inference --models tiny224 tiny1024   # the pair's inference
    python benchmarks/profile_train_step.py --compare --steps 5   # unfused vs fused mixer, interleaved
    python benchmarks/profile_train_step.py --kernels-from HEAD~1 --models demo16 d192   # kernels A/B

For each model: the median ms/step over ``--steps`` timed steps (after ``--warmup``), then one
step under ``torch.profiler`` with the top ops by self CPU time, so that the share of the scan,
the linears, conv1d, flips / copies and elementwise ops is visible. Not a test: timings depend on
the machine and its load (printed from ``os.getloadavg``). ``--json`` saves the numbers.

``--kernels-from REV`` builds the compiled CPU kernels (``src/shufflemamba/ops/csrc``) as they were
at git revision REV, with the flags and vector width the current ones run with, and times training
steps alternately with those and the current kernels in one process (the Python side is the
current one for both, so REV must have the same kernel ABI): the before / after of a kernel change
measured side by side, with the machine's load changes hitting both alike.

``--kernels-flags=FLAGS`` (the ``=`` form: FLAGS starts with a dash) builds the kernels (of REV
with ``--kernels-from``, else of the working tree) with compiler flags added, e.g. ``-DEB=64`` or
``-funroll-loops``, for the same A/B; ``--core`` times the first block's mixer core instead of whole
steps, its forward and backward apart:
    python benchmarks/profile_train_step.py --kernels-from HEAD --core --models d192 --steps 30
    python benchmarks/profile_train_step.py --kernels-flags=-DEB=64 --core --models d192 --steps 30

``--compare`` times the mixer's unfused path ((B, E, L) scan with flips and transposes) against
the fused channel-last path (compiled conv1d + reverse scan) on the same model, alternating
steps so that load changes hit both alike; it reports the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
import timm
from shufflemamba.process import tune_malloc

# name -> (create_model kwargs, batch, image size, in_chans)
MODELS: dict[str, tuple[dict, int, int, int]] = {
    "demo": (
        dict(model_name="vim_tiny_patch16_224", in_chans=1, img_size=28, patch_size=4, embed_dim=96, depth=4,
             d_state=8, cls_position="head", num_classes=10, slws_rate=0.1),
        128, 28, 1,
    ),
    # the demo as configs/demo.yaml has it since 2026-12-01: 16 px, patch 4 -> 16 patches + class token
    "demo16": (
        dict(model_name="vim_tiny_patch16_224", in_chans=1, img_size=16, patch_size=4, embed_dim=96, depth=4,
             d_state=8, cls_position="head", num_classes=10, slws_rate=0.1),
        128, 16, 1,
    ),
    "study": (
        dict(model_name="vim_tiny_patch16_224", in_chans=1, img_size=28, patch_size=4, embed_dim=128, depth=8,
             d_state=8, cls_position="head", num_classes=10, slws_rate=0.1),
        128, 28, 1,
    ),
    "tiny224": (dict(model_name="vim_tiny_patch16_224", num_classes=1000), 8, 224, 3),
    "tiny1024": (dict(model_name="vim_tiny_patch16_224", num_classes=1000, img_size=1024), 1, 1024, 3),  # the pair's 1024 px
    # the Vim of `shufflemamba bench`'s "D 192, depth 12, 65 tokens" setup (shufflemamba/bench/vit.py), SLWS off as there
    "d192": (
        dict(model_name="vim_tiny_patch16_224", in_chans=3, img_size=64, patch_size=8, embed_dim=192, depth=12,
             d_state=16, cls_position="middle", num_classes=100, slws_rate=0.0),
        64, 64, 3,
    ),
}


def make_step(name: str, seed: int = 0, inference: bool = False):
    """Build the model, optimizer and a fixed batch; return a closure running one training step (with
    ``inference``: one forward in inference mode, as the paper's pair times it)."""
    kwargs, batch, img, chans = MODELS[name]
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    model = timm.create_model(kwargs.pop("model_name"), **kwargs).train(not inference)
    if inference:
        x = torch.randn(batch, chans, img, img)

        def forward() -> float:
            with torch.inference_mode():
                return float(model(x).sum())

        return forward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, chans, img, img)
    y = torch.randint(0, model.num_classes, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def time_step(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile_step(step, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = []
    for e in events[:top]:
        rows.append(dict(op=e.key, calls=e.count, self_ms=e.self_cpu_time_total / 1e3,
                         share=e.self_cpu_time_total / total))
    return rows


def _set_fused(on: bool) -> None:
    from shufflemamba.models.mamba_mixer import BiMambaMixer

    if on:
        BiMambaMixer.__dict__.get("_orig_use_fused") and setattr(
            BiMambaMixer, "_use_fused_cpu", BiMambaMixer._orig_use_fused)
    else:
        if "_orig_use_fused" not in BiMambaMixer.__dict__:
            BiMambaMixer._orig_use_fused = BiMambaMixer._use_fused_cpu
        BiMambaMixer._use_fused_cpu = lambda self, hidden: False


def compare(name: str, steps: int, warmup: int) -> dict:
    """Interleaved old (unfused) / new (fused) steps of one model; medians of each."""
    step = make_step(name)
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    for i in range(warmup + steps):
        for mode in ("unfused", "fused") if i % 2 == 0 else ("fused", "unfused"):
            _set_fused(mode == "fused")
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[mode].append((time.perf_counter() - t0) * 1e3)
    _set_fused(True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: unfused {med['unfused']:.1f} ms/step, fused {med['fused']:.1f} ms/step "
          f"({med['unfused'] / med['fused']:.2f}x), load {os.getloadavg()[0]:.2f}")
    return dict(median=med, times=times)


def make_core(name: str, seed: int = 0):
    """The first block's mixer core (``bimamba_core_cl``: both directions' conv, x_proj, dt_proj, scan and
    gate) at the model's shapes; returns a closure running it forward and backward, timed apart."""
    from shufflemamba.ops.cpu_mixer import bimamba_core_cl

    kwargs, batch, img, chans = MODELS[name]
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    model = timm.create_model(kwargs.pop("model_name"), **kwargs)
    mixer = model.layers[0].mixer
    shapes = []  # in_proj's output, (1, L, 2E), from one image through the model
    hook = mixer.in_proj.register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, chans, img, img))
    hook.remove()
    xz = torch.randn(batch, *shapes[0][1:], requires_grad=True)
    gy = torch.randn(batch, shapes[0][1], mixer.d_inner)

    def run() -> tuple[float, float]:
        fwd = mixer._params_cl(mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D, xz.dtype)
        bwd = mixer._params_cl(mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b, xz.dtype)
        t0 = time.perf_counter()
        y = bimamba_core_cl(xz, mixer.dt_rank, fwd, bwd)
        t1 = time.perf_counter()
        y.backward(gy)
        t2 = time.perf_counter()
        xz.grad = None
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    return run


def kernels_at(rev: str | None, extra_flags: tuple[str, ...] = (), edit: Callable[[str, str], str] | None = None):
    """The compiled CPU kernels as they were at git revision ``rev`` (None: the working tree's sources),
    built like the current ones, with ``extra_flags`` added to the compiler's; ``edit(name, text)``, when
    given, returns each source file's text as it is to be built (benchmarks/exp_bound.py's stand-ins)."""
    import ctypes
    import subprocess
    import tempfile

    from shufflemamba.ops import cpu_library

    current = cpu_library.library()
    root = Path(__file__).resolve().parent.parent
    csrc = "src/shufflemamba/ops/csrc"

    def git(*cmd: str) -> str:
        res = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"error: git {' '.join(cmd)}: {res.stderr.strip()}")
        return res.stdout

    tmp = Path(tempfile.mkdtemp(prefix="kernels-"))
    if rev is None:
        names = sorted(f.name for f in (root / csrc).iterdir() if f.suffix in (".c", ".h"))
        for name in names:
            (tmp / name).write_text((root / csrc / name).read_text())
    else:
        names = git("ls-tree", "--name-only", f"{rev}:{csrc}").split()
        for name in names:
            (tmp / name).write_text(git("show", f"{rev}:{csrc}/{name}"))
    if edit is not None:
        for name in names:
            (tmp / name).write_text(edit(name, (tmp / name).read_text()))
    width = (cpu_library.vector_width_info() or {}).get("width")
    try:  # the package's own build, with the flags and width the current kernels have
        cpu_library.build(os.environ.get("CC", "cc"), tmp / "lib.so", str(width) if width else None, csrc=tmp,
                        sources=tuple(tmp / n for n in names if n.endswith(".c")), extra_flags=extra_flags)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"error: building the kernels of {rev or 'the working tree'} {' '.join(extra_flags)} "
                         f"failed: {str(exc).strip()[-2000:]}") from None
    lib = ctypes.CDLL(str(tmp / "lib.so"))
    lib.ss_abi_version.restype = ctypes.c_int
    if lib.ss_abi_version() != current.ss_abi_version():
        raise SystemExit(f"error: {rev}'s kernels have ABI {lib.ss_abi_version()}, the current ones "
                         f"{current.ss_abi_version()}: their Python sides differ, compare with an older checkout")
    cpu_library.declare(lib, missing_ok=rev is not None)
    return lib


def compare_kernels(name: str, rev: str | None, steps: int, warmup: int, extra_flags: tuple[str, ...] = (),
                    core: bool = False) -> dict:
    """Interleaved training steps of one model (``core``: its first mixer core, forward and backward timed
    apart) with the kernels of ``rev`` (None: the working tree's) built with ``extra_flags``, and with the
    current ones; medians of each and the median of the pairs' ratios (other / current time: > 1 means
    the current kernels are faster)."""
    from shufflemamba.ops import cpu_library

    label = " ".join([rev or "working tree", *extra_flags])
    libs = {label: kernels_at(rev, extra_flags), "current": cpu_library.library()}
    if core:
        run, parts = make_core(name), ("forward", "backward")
    else:
        step = make_step(name)

        def run() -> tuple[float]:
            t0 = time.perf_counter()
            step()
            return ((time.perf_counter() - t0) * 1e3,)

        parts = ("step",)
    times: dict[str, dict[str, list[float]]] = {k: {part: [] for part in parts} for k in libs}
    order = list(libs)
    try:
        for i in range(warmup + steps):
            for k in order if i % 2 == 0 else order[::-1]:
                cpu_library.swap_library(libs[k])
                ms = run()
                if i >= warmup:
                    for part, v in zip(parts, ms):
                        times[k][part].append(v)
    finally:
        cpu_library.swap_library(libs["current"])
    res = {}
    for part in parts:
        med = {k: statistics.median(times[k][part]) for k in libs}
        paired = statistics.median(a / b for a, b in zip(times[label][part], times["current"][part]))
        print(f"{name} {part}: kernels of {label} {med[label]:.2f} ms, current {med['current']:.2f} ms; "
              f"speed-up (median of pairs) {paired:.3f}x, load {os.getloadavg()[0]:.2f}")
        res[part] = dict(median=med, speedup_paired=paired, times={k: times[k][part] for k in libs})
    return res["step"] if not core else res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "tiny1024"], choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--no-profile", action="store_true", help="only time the steps")
    p.add_argument("--compare", action="store_true", help="unfused vs fused mixer, interleaved")
    p.add_argument("--kernels-from", metavar="REV", help="A/B: the CPU kernels of git revision REV vs the current ones")
    p.add_argument("--kernels-flags", metavar="FLAGS", default="",
                   help="A/B: the kernels built with these compiler flags added (--kernels-flags=-DEB=64; "
                        "of REV with --kernels-from, else of the working tree) vs the current ones")
    p.add_argument("--core", action="store_true",
                   help="with --kernels-from / --kernels-flags: time the first mixer core's forward and backward "
                        "instead of whole steps")
    p.add_argument("--inference", action="store_true",
                   help="time and profile forward passes in inference mode instead of training steps")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.core and not (args.kernels_from or args.kernels_flags):
        p.error("--core needs --kernels-from or --kernels-flags")
    if args.inference and (args.compare or args.kernels_from or args.kernels_flags):
        p.error("--inference profiles the models alone: not with --compare, --kernels-from or --kernels-flags")
    if args.inference:  # as `shufflemamba bench` and the paper's pair time inference (without it each forward
        tune_malloc()   # faults its tensors in again: Vim-Ti at 224 px 113 against 78 ms on the Zen 5, AVX-512)
    if args.kernels_from or args.kernels_flags:
        from shufflemamba.ops.cpu_scan import describe_vector_width

        print(describe_vector_width())
        flags = tuple(args.kernels_flags.split())
        res = {name: compare_kernels(name, args.kernels_from, args.steps, args.warmup, flags, args.core)
               for name in args.models}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(threads=args.threads, kernels_from=args.kernels_from,
                                                 kernels_flags=flags, core=args.core,
                                                 cpu_kernels=describe_vector_width(), compare=res), indent=2))
        return 0
    if args.compare:
        res = {name: compare(name, args.steps, args.warmup) for name in args.models}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(threads=args.threads, compare=res), indent=2))
        return 0

    from shufflemamba.ops.cpu_scan import describe_vector_width

    kernels = describe_vector_width()  # which vector width the compiled kernels run with (issue 12)
    print(kernels)
    results = {"threads": args.threads, "loadavg_start": os.getloadavg()[0], "torch": torch.__version__,
               "cpu_kernels": kernels, "inference": args.inference, "models": {}}
    for name in args.models:
        step = make_step(name, inference=args.inference)
        times = time_step(step, args.steps, args.warmup)
        med = statistics.median(times)
        print(f"\n== {name}: {med:.1f} ms/step median (min {min(times):.1f}, {args.steps} steps, "
              f"{args.threads} threads, load {os.getloadavg()[0]:.2f})")
        entry = dict(ms_median=med, ms_min=min(times), times=times)
        if not args.no_profile:
            rows = profile_step(step, args.top)
            print(f"{'op':<48} {'calls':>6} {'self ms':>9} {'share':>6}")
            for r in rows:
                print(f"{r['op'][:48]:<48} {r['calls']:>6} {r['self_ms']:>9.1f} {r['share']:>6.1%}")
            entry["top_ops"] = rows
        results["models"][name] = entry
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
