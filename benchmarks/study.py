"""The SLWS evidence study: does layer-wise shuffling reduce overfitting of a plain Vim?

Trains one Vim, deep and wide enough to overfit a reduced Fashion-MNIST training set, under several
SLWS settings with three seeds each (same budget, same everything else), then writes docs/study.md
with a table (test top-1 mean and spread, final train loss, train/test gap, seconds per epoch) and a
plot of test accuracy over epochs per setting.

Every run is an ordinary ``shufflemamba train`` subprocess writing to OUTPUT/<setting>-s<seed>, so
the study resumes where it stopped: finished runs are skipped and interrupted runs continue from
their last checkpoint (``--resume``). ``--background`` detaches the study and logs to OUTPUT/study.log.

    python benchmarks/study.py --output runs/study              # foreground
    python benchmarks/study.py --output runs/study --background # detached; `tail -f` the log
    python benchmarks/study.py --output runs/study --report     # re-render the report only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from docs_section import write_marked_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, max rate, schedule): SLWS off, the paper's linear 0.5, the constant alternative, two other rates
SETTINGS: list[tuple[str, float, str]] = [
    ("off", 0.0, "linear"),
    ("linear-0.5", 0.5, "linear"),
    ("constant-0.5", 0.5, "constant"),
    ("linear-0.2", 0.2, "linear"),
    ("linear-0.8", 0.8, "linear"),
]
SEEDS = (0, 1, 2)

# The shared recipe (model, optimiser, no augmentation): everything but the SLWS settings and seed.
RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.yaml")


def train_args(args: argparse.Namespace, rate: float, schedule: str, seed: int, out: str) -> list[str]:
    return [
        "--config", RECIPE, "--train-subset", str(args.train_subset), "--epochs", str(args.epochs),
        "--slws-rate", str(rate), "--slws-schedule", schedule, "--seed", str(seed), "--output", out,
    ]


def read_rows(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_one(args: argparse.Namespace, name: str, rate: float, schedule: str, seed: int) -> None:
    out = os.path.join(args.output, f"{name}-s{seed}")
    if len(read_rows(out)) >= args.epochs:
        print(f"[study] {name} seed {seed}: done, skipped", flush=True)
        return
    cmd = [sys.executable, "-m", "shufflemamba", "train", *train_args(args, rate, schedule, seed, out)]
    last = os.path.join(out, "last.pt")
    if os.path.exists(last):
        cmd += ["--resume", last]
    print(f"[study] {name} seed {seed}: {'resuming' if os.path.exists(last) else 'starting'}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(os.path.join(args.output, f"{name}-s{seed}.log"), "a", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def load_final(out: str) -> tuple[Any, dict[str, Any], int, Any]:
    """A finished run's final weights (OUTPUT/last.pt) as (model, config, in_chans, eval transform)."""
    from shufflemamba.training.data import build_transform
    from shufflemamba.training.checkpointing import load_training_checkpoint
    from shufflemamba.training.model_setup import build_model, model_in_chans

    ckpt = load_training_checkpoint(os.path.join(out, "last.pt"))
    cfg, kwargs = ckpt["config"], dict(ckpt["model_kwargs"])
    in_chans = model_in_chans(kwargs)
    model = build_model(ckpt["model_name"], kwargs)
    model.load_state_dict(ckpt["model"])
    return model, cfg, in_chans, build_transform(cfg, in_chans, is_training=False)


def final_accuracy(out: str) -> tuple[dict[str, float], dict[str, float]]:
    """Final weights on the run's own training subset and on the full test set, without augmentation
    (the per-epoch curves use a test subset to keep epochs cheap)."""
    from shufflemamba.training.data import build_dataset, collate_skip, subset
    from shufflemamba.training.engine import evaluate

    model, cfg, in_chans, transform = load_final(out)
    results = []
    for split, n in (("train", cfg["train_subset"]), ("val", None)):
        ds = subset(build_dataset(cfg, split, in_chans, transform), n, cfg["seed"])
        loader = torch.utils.data.DataLoader(ds, batch_size=500, collate_fn=collate_skip)
        results.append(evaluate(model, loader, torch.device("cpu")))
    return results[0], results[1]


def summarise(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name, rate, schedule in SETTINGS:
        runs = []
        for seed in SEEDS:
            out = os.path.join(args.output, f"{name}-s{seed}")
            rows = read_rows(out)
            if len(rows) < args.epochs:
                continue
            final = rows[args.epochs - 1]
            train_eval, test_eval = final_accuracy(out)
            runs.append({
                "seed": seed, "test_top1": test_eval["top1"], "train_top1": train_eval["top1"],
                "train_loss": final["train_loss"], "test_loss": test_eval["loss"],
                "gap": train_eval["top1"] - test_eval["top1"],
                "best_curve_top1": max(r["val_top1"] for r in rows[: args.epochs]),
                # training time alone (epoch_seconds also holds the per-epoch evaluation)
                "train_seconds": statistics.median(args.train_subset / r["images_per_second"] for r in rows[: args.epochs]),
                "curve": [r["val_top1"] for r in rows[: args.epochs]],
            })
        results.append({"setting": name, "rate": rate, "schedule": schedule, "runs": runs})
    return results


def _mean_sd(values: list[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


FINDINGS_BEGIN, FINDINGS_END = "<!-- findings:begin -->", "<!-- findings:end -->"
FIRST_BEGIN, FIRST_END = "<!-- first-study:begin -->", "<!-- first-study:end -->"


def kept_findings(path: str) -> str:
    """The hand-written reading of the numbers between the findings markers of an existing report
    (kept when the tables are re-rendered), or a reminder to write one."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if FINDINGS_BEGIN in text and FINDINGS_END in text:
            return text.split(FINDINGS_BEGIN, 1)[1].split(FINDINGS_END, 1)[0].strip("\n")
    return "### What the numbers say\n\n(to be written by whoever ran the study, from the table above)"


def write_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = os.path.join(ROOT, "docs")
    os.makedirs(docs, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results:
        if not res["runs"]:
            continue
        curves = [r["curve"] for r in res["runs"]]
        mean = [statistics.mean(c[i] for c in curves) for i in range(args.epochs)]
        ax.plot(range(1, args.epochs + 1), mean, label=f"{res['setting']} (n={len(curves)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.set_title(f"Fashion-MNIST, {args.train_subset} training images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "study_test_top1.png"), dpi=120)
    plt.close(fig)

    import yaml

    with open(RECIPE, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    lines = [
        "## First round: SLWS as the only regulariser",
        "",
        f"A Vim ({recipe['model_kwargs']}) trained {args.epochs} epochs with the recipe in `benchmarks/study.yaml`",
        f"(AdamW lr {recipe['lr']}, batch {recipe['batch_size']}, no augmentation, no label smoothing, no drop path)",
        f"on a fixed random subset of {args.train_subset} Fashion-MNIST training images",
        "(a different subset per seed, the same across settings). Test top-1, test loss and train top-1 are",
        "measured on the final weights without augmentation, test on all 10,000 test images; the per-epoch",
        f"curve (and its best epoch) uses a fixed {recipe['val_subset']:,}-image subset of the test set to keep epochs cheap.",
        "Train s / epoch is the training pass alone (median over epochs), the cost of SLWS included.",
        "Mean ± standard deviation over seeds "
        f"{', '.join(map(str, SEEDS))}. The train/test gap is train top-1 (final weights, no augmentation) minus test top-1.",
        "",
        "| setting | test top-1 (%) | best epoch, picked on test images: optimistic (%) | train top-1 (%) | gap (points) | final train loss | test loss | train s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        runs = res["runs"]
        col = lambda key: [r[key] for r in runs]  # noqa: E731
        lines.append(
            f"| {res['setting']} | {_mean_sd(col('test_top1'))} | {_mean_sd(col('best_curve_top1'))} | "
            f"{_mean_sd(col('train_top1'))} | {_mean_sd(col('gap'))} | {_mean_sd(col('train_loss'))} | "
            f"{_mean_sd(col('test_loss'))} | {_mean_sd(col('train_seconds'))} |"
        )
    lines += [
        "",
        "![test top-1 per epoch](study_test_top1.png)",
        "",
        f"Produced by `make study` (`python benchmarks/study.py --output {args.output} --epochs {args.epochs} "
        f"--train-subset {args.train_subset} --jobs {args.jobs} --threads {args.threads}`) at commit {commit}, on {cpu} "
        f"({os.cpu_count()} cores, no GPU), torch {torch.__version__}. Per-run metrics: `{args.output}/*/metrics.jsonl`; "
        "the numbers above: `docs/study.json`.",
    ]
    with open(os.path.join(docs, "study.json"), "w", encoding="utf-8") as f:
        json.dump({"epochs": args.epochs, "train_subset": args.train_subset, "results": results}, f, indent=1)
    path = os.path.join(docs, "study.md")
    lines += ["", FINDINGS_BEGIN, kept_findings(path), FINDINGS_END]
    text = "\n".join(lines) + "\n"
    # only this study's section: docs/study.md also holds the depth study's (benchmarks/study_depth.py)
    write_marked_section(Path(path), text, FIRST_BEGIN, FIRST_END)
    return text


def study_lock(output: str) -> Any:
    """An exclusive lock on OUTPUT/study.lock, or None (with an error line) if a study holds it:
    two studies in one folder would train the same runs at the same time."""
    import fcntl

    lock = open(os.path.join(output, "study.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        print(f"error: a study is already running in {output} (see {output}/study.log)", file=sys.stderr)
        return None
    return lock


def run_in_background(script: str, argv: list[str] | None, output: str, what: str) -> int:
    """Re-run ``script`` with ``argv`` minus --background, detached, logging to OUTPUT/study.log;
    1 (with an error line) if a study already holds OUTPUT's lock."""
    lock = study_lock(output)
    if lock is None:
        return 1
    lock.close()  # the detached child takes it
    log_path = os.path.join(output, "study.log")
    cmd = [sys.executable, os.path.abspath(script), *[a for a in (argv or sys.argv[1:]) if a != "--background"]]
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"{what} running in the background (pid {proc.pid}); follow it with: tail -f {log_path}")
    print("run the same command again to resume it if it is interrupted")
    return 0


_HELD_LOCKS: list[Any] = []  # study locks this process holds until it exits


def add_run_options(parser: argparse.ArgumentParser, report_help: str) -> None:
    """The options both studies share: how many runs at once, threads per run, detaching, report only."""
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--background", action="store_true", help="detach and log to OUTPUT/study.log")
    parser.add_argument("--report", action="store_true", help=report_help)


def train_all(output: str, jobs: int, run: Any, todo: list[tuple]) -> float | None:
    """Train ``run(*job)`` for every job in ``todo``, ``jobs`` at a time, under OUTPUT's study lock
    (held until the process exits, so that the report written after is this study's too); the
    minutes it took, or None (with an error line) if another study holds the lock."""
    from concurrent.futures import ThreadPoolExecutor

    lock = study_lock(output)
    if lock is None:
        return None
    _HELD_LOCKS.append(lock)
    start = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(run, *job) for job in todo]:
            fut.result()
    return (time.time() - start) / 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/study")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=2000)
    add_run_options(parser, "only re-render docs/study.md from finished runs")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    if args.background:
        return run_in_background(__file__, argv, args.output, "study")

    if not args.report:
        todo = [(args, name, rate, sched, seed) for seed in SEEDS for name, rate, sched in SETTINGS]
        minutes = train_all(args.output, args.jobs, run_one, todo)
        if minutes is None:
            return 1
        print(f"[study] all runs finished in {minutes:.1f} min", flush=True)
    print(write_report(args, summarise(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
