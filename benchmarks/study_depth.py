"""The second SLWS evidence study: does layer-wise shuffling help deeper Vims under a heavy recipe?

One width, two depths far apart (6 and 24 layers), SLWS off against the paper's linear 0.5, the
same seeds for both (paired), the recipe in ``study_depth.yaml`` (augmentation, label smoothing,
drop path, AdamW warmup + cosine, 40 epochs on 2,000 Fashion-MNIST images per seed). Curves are
read on 2,000 held-out training images; the 10,000 test images are read once, by each run's final
weights. The report is the paired difference SLWS minus off per depth with its standard error, and
the depth interaction (difference at 24 minus difference at 6), written to the "depth study"
section of docs/study.md with a plot (docs/study_depth.png) and the raw numbers (docs/study_depth.json).

Every run is an ordinary ``shufflemamba train`` subprocess writing to OUTPUT/d<depth>-<setting>-s<seed>,
so the study resumes where it stopped (finished runs skipped, interrupted runs resumed). The first
run is the pilot the design asks for, the deepest model with SLWS off: ``--pilot`` trains only it
and says whether its held-out loss ever rises (if it never does there is nothing for SLWS to fix).

    python benchmarks/study_depth.py --output runs/study_depth --background   # `make study-depth`
    python benchmarks/study_depth.py --output runs/study_depth --pilot        # the pilot alone
    python benchmarks/study_depth.py --output runs/study_depth --report       # re-render only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from docs_section import write_marked_section
from shufflemamba.bench.report import cpu_model
from study import (_mean_sd, add_run_options, load_final, read_rows, run_in_background,  # the first study's helpers
                   train_all)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = Path(__file__).resolve().parent / "study_depth.yaml"
BEGIN, END = "<!-- depth-study:begin -->", "<!-- depth-study:end -->"

# (name, max rate, schedule)
SETTINGS = {"off": (0.0, "linear"), "linear-0.5": (0.5, "linear"), "constant-0.5": (0.5, "constant")}


def run_name(depth: int, setting: str, seed: int) -> str:
    return f"d{depth}-{setting}-s{seed}"


def jobs(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """Seed-major order (a stopped study leaves whole seeds), deepest first: the first job is the pilot."""
    depths = sorted(args.depths, reverse=True)
    return [(d, s, seed) for seed in args.seeds for d in depths for s in args.settings]


def run_one(args: argparse.Namespace, depth: int, setting: str, seed: int) -> None:
    name = run_name(depth, setting, seed)
    out = os.path.join(args.output, name)
    if len(read_rows(out)) >= args.epochs:
        print(f"[study-depth] {name}: done, skipped", flush=True)
        return
    rate, schedule = SETTINGS[setting]
    cmd = [
        sys.executable, "-m", "shufflemamba", "train", "--config", str(RECIPE), "--epochs", str(args.epochs),
        "--model-kwargs", f"depth={depth}", "--slws-rate", str(rate), "--slws-schedule", schedule,
        "--seed", str(seed), "--train-subset", str(args.train_subset), "--output", out,
    ]
    if os.path.isdir(out) and any(f.endswith(".pt") for f in os.listdir(out)):
        cmd += ["--resume", out]
    print(f"[study-depth] {name}: {'resuming' if '--resume' in cmd else 'starting'} ({time.strftime('%H:%M:%S')})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(os.path.join(args.output, f"{name}.log"), "a", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[study-depth] {name}: finished ({time.strftime('%H:%M:%S')})", flush=True)


# A held-out loss that ends this much above its lowest value (relative) counts as overfitting;
# less is within the epoch-to-epoch noise of a 2,000-image held-out set (~1-3% here).
RISE_THRESHOLD = 0.05


def loss_rise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Where the held-out loss bottoms out and how far it climbs after (the pilot's question)."""
    losses = [r["val_loss"] for r in rows]
    low = min(range(len(losses)), key=losses.__getitem__)
    return {"min_epoch": low + 1, "min_loss": losses[low], "final_loss": losses[-1], "rise": losses[-1] - losses[low]}


def overfits(rise: dict[str, float]) -> bool:
    """The pilot's verdict: the held-out loss ends clearly (RISE_THRESHOLD) above its minimum."""
    return rise["rise"] > RISE_THRESHOLD * rise["min_loss"]


def final_eval(out: str) -> dict[str, float]:
    """The final weights, without augmentation, on the run's own training images (clean train top-1
    and loss) and on all 10,000 test images."""
    from shufflemamba.training.data import build_dataset, collate_skip, holdout_split, subset
    from shufflemamba.training.engine import evaluate

    model, cfg, in_chans, transform = load_final(out)
    train_ds = build_dataset(cfg, "train", in_chans, transform)
    pool, _ = holdout_split(len(train_ds), cfg["holdout"], cfg["seed"])  # the same draw as training
    train_ds = subset(torch.utils.data.Subset(train_ds, pool), cfg["train_subset"], cfg["seed"])
    test_ds = build_dataset(cfg, "val", in_chans, transform)
    res = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        loader = torch.utils.data.DataLoader(ds, batch_size=500, collate_fn=collate_skip)
        ev = evaluate(model, loader, torch.device("cpu"))
        res[f"{split}_top1"], res[f"{split}_loss"] = ev["top1"], ev["loss"]
    return res


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per finished run (final eval cached in the run folder: it reads 15,000 images)."""
    runs = []
    for depth, setting, seed in jobs(args):
        out = os.path.join(args.output, run_name(depth, setting, seed))
        rows = read_rows(out)[: args.epochs]
        if len(rows) < args.epochs:
            continue
        cache = os.path.join(out, "final_eval.json")
        if os.path.exists(cache):
            with open(cache, encoding="utf-8") as f:
                ev = json.load(f)
        else:
            ev = final_eval(out)
            with open(cache, "w", encoding="utf-8") as f:
                json.dump(ev, f)
        runs.append({
            "depth": depth, "setting": setting, "seed": seed, **ev,
            "final_train_loss_aug": rows[-1]["train_loss"],  # augmented, smoothed: what training saw
            # the training pass alone (epoch_seconds also holds the held-out evaluation)
            "train_seconds_per_epoch": statistics.median(args.train_subset / r["images_per_second"] for r in rows),
            "val_top1": [r["val_top1"] for r in rows], "val_loss": [r["val_loss"] for r in rows],
            **{f"val_{k}": v for k, v in loss_rise(rows).items()},
        })
    return runs


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sd / sqrt(n)); se is nan for one value."""
    m = statistics.mean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def paired(runs: list[dict[str, Any]], depth: int, setting: str, key: str = "test_top1") -> dict[int, float]:
    """Per seed: ``key`` of ``setting`` minus ``key`` of off, at ``depth`` (seeds with both runs only)."""
    by = {(r["setting"], r["seed"]): r[key] for r in runs if r["depth"] == depth}
    return {seed: v - by[("off", seed)] for (s, seed), v in by.items() if s == setting and ("off", seed) in by}


def verdict(m: float, se: float) -> str:
    if math.isnan(se):
        return "one seed: no call"
    return "effect (beyond 2 SE)" if abs(m) > 2 * se else "no call (within 2 SE)"


def fmt(m: float, se: float, digits: int = 2) -> str:
    return f"{m:+.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{m:+.{digits}f}"


FINDINGS_BEGIN, FINDINGS_END = "<!-- depth-findings:begin -->", "<!-- depth-findings:end -->"


def kept_findings(path: Path) -> str:
    """The hand-written reading between the findings markers of the current report (kept when the
    tables are re-rendered), or a reminder to write one."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if FINDINGS_BEGIN in text and FINDINGS_END in text:
        return text.split(FINDINGS_BEGIN, 1)[1].split(FINDINGS_END, 1)[0].strip("\n")
    return "### What the numbers say\n\n(to be written by whoever ran the study, from the tables above)"


def plot(args: argparse.Namespace, runs: list[dict[str, Any]], path: Path) -> None:
    """Left: the paired gain (SLWS minus off, test top-1) per depth, each seed and mean +- SE.
    Right: the held-out loss per epoch, mean over seeds, per depth and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in runs})
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, setting in enumerate(s for s in args.settings if s != "off"):
        for depth in depths:
            diffs = paired(runs, depth, setting)
            if not diffs:
                continue
            x = depth + 0.4 * k
            ax.plot([x] * len(diffs), list(diffs.values()), "o", color=f"C{k}", alpha=0.4)
            m, se = mean_se(list(diffs.values()))
            ax.errorbar([x], [m], yerr=[0 if math.isnan(se) else se], fmt="s", color=f"C{k}", capsize=5,
                        label=f"{setting} (mean ± SE)" if depth == depths[0] else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(depths)
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("test top-1, SLWS minus off (points)")
    ax.set_title("paired gain per seed (dots) and mean ± SE")
    ax.legend()
    for i, depth in enumerate(depths):
        for k, setting in enumerate(args.settings):
            curves = [r["val_loss"] for r in runs if r["depth"] == depth and r["setting"] == setting]
            if curves:
                mean = [statistics.mean(c[e] for c in curves) for e in range(len(curves[0]))]
                ax_loss.plot(range(1, len(mean) + 1), mean, color=f"C{i}", ls=["-", "--", ":"][k % 3],
                             label=f"depth {depth}, {setting}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("held-out loss (2,000 training images)")
    ax_loss.set_title("held-out loss, mean over seeds")
    ax_loss.legend(fontsize=8)
    for a in (ax, ax_loss):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    """The depth-study section of docs/study.md (between its markers), the plot and the raw numbers."""
    import yaml

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    plot(args, runs, docs / "study_depth.png")
    with open(docs / "study_depth.json", "w", encoding="utf-8") as f:
        json.dump({"epochs": args.epochs, "runs": runs}, f, indent=1)
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # the package the training runs imported (PYTHONPATH may point at a frozen checkout, so that
    # commits made while the study runs cannot change its later runs)
    pkg = Path(shufflemamba.__file__).resolve().parent
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True, text=True).stdout.strip()
    depths = sorted({r["depth"] for r in runs})
    slws = [s for s in args.settings if s != "off"]
    lines = [
        "## Second round: depth, under a heavy recipe",
        "",
        f"Vim `{recipe['model_kwargs']}` at depths {', '.join(map(str, depths))}, {args.epochs} epochs of the recipe in",
        f"`benchmarks/study_depth.yaml`: random resized crop (scale {recipe['scale']}) + flip, label smoothing",
        f"{recipe['smoothing']}, drop path {recipe['drop_path']}, AdamW lr {recipe['lr']} (batch {recipe['batch_size']}, "
        f"{recipe['warmup_epochs']} warmup epochs, cosine to {recipe['min_lr']}), weight decay {recipe['weight_decay']}.",
        f"Each seed draws its own {recipe['train_subset']:,} training images and {recipe['holdout']:,} other training",
        "images held out for the per-epoch curves; every setting of a seed sees the same images. The",
        "10,000 test images are read once, by each run's final weights (no epoch is picked on them).",
        "Clean train = the final weights on the run's own training images without augmentation.",
        "",
        "| depth | setting | seeds | test top-1 (%) | clean train top-1 (%) | clean train loss | test loss | held-out loss: lowest at epoch | its rise to the end | train s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for depth in depths:
        for setting in args.settings:
            rs = [r for r in runs if r["depth"] == depth and r["setting"] == setting]
            if not rs:
                continue
            col = lambda key: [r[key] for r in rs]  # noqa: E731
            lines.append(
                f"| {depth} | {setting} | {len(rs)} | {_mean_sd(col('test_top1'))} | {_mean_sd(col('train_top1'))} | "
                f"{_mean_sd(col('train_loss'), 3)} | {_mean_sd(col('test_loss'), 3)} | "
                f"{', '.join(str(v) for v in col('val_min_epoch'))} | {_mean_sd(col('val_rise'), 3)} | "
                f"{_mean_sd(col('train_seconds_per_epoch'), 1)} |"
            )
    for pilot_dir in args.pilots:  # earlier pilots that decided the subset size
        for name in sorted(os.listdir(pilot_dir)) if os.path.isdir(pilot_dir) else []:
            rows = read_rows(os.path.join(pilot_dir, name))
            cfg_path = os.path.join(pilot_dir, name, "config.yaml")
            if "-off-" not in name or not rows or not os.path.exists(cfg_path):  # pilots are SLWS-off runs
                continue
            n = yaml.safe_load(open(cfg_path, encoding="utf-8")).get("train_subset")
            r = loss_rise(rows)
            lines += ["", f"Pilot `{pilot_dir}/{name}` ({n:,} training images, {len(rows)} epochs): held-out loss "
                      f"lowest at epoch {r['min_epoch']} ({r['min_loss']:.3f}), final {r['final_loss']:.3f} "
                      f"(rise {r['rise']:.3f}: {'overfits' if overfits(r) else f'no overfitting by the {RISE_THRESHOLD:.0%} rule'}); "
                      f"held-out top-1 at the end {rows[-1]['val_top1']:.1f}%."]
    lines += [
        "",
        "Mean ± standard deviation over seeds. The paired difference is per seed, SLWS minus off, in test",
        "top-1 points; its standard error is sd / sqrt(n). An effect is called only where the mean lies beyond 2 SE of zero.",
        "",
        "| comparison | per seed | mean ± SE | call |",
        "|---|---|---|---|",
    ]
    for setting in slws:
        per_depth = {}
        for depth in depths:
            diffs = paired(runs, depth, setting)
            if not diffs:
                continue
            per_depth[depth] = diffs
            m, se = mean_se(list(diffs.values()))
            seeds = ", ".join(f"s{k}: {v:+.2f}" for k, v in sorted(diffs.items()))
            lines.append(f"| {setting} − off, depth {depth} | {seeds} | {fmt(m, se)} | {verdict(m, se)} |")
        if len(per_depth) >= 2:
            lo, hi = min(per_depth), max(per_depth)
            common = sorted(set(per_depth[lo]) & set(per_depth[hi]))
            if common:
                inter = {k: per_depth[hi][k] - per_depth[lo][k] for k in common}
                m, se = mean_se(list(inter.values()))
                seeds = ", ".join(f"s{k}: {v:+.2f}" for k, v in inter.items())
                lines.append(f"| depth interaction ({setting}): gain at {hi} − gain at {lo} | {seeds} | {fmt(m, se)} | {verdict(m, se)} |")
    lines += [
        "",
        "![paired gain vs depth, and held-out loss curves](study_depth.png)",
        "",
        f"Produced by `make study-depth` (`python benchmarks/study_depth.py --output {args.output} --depths "
        f"{' '.join(map(str, args.depths))} --settings {' '.join(args.settings)} --seeds {' '.join(map(str, args.seeds))} "
        f"--jobs {args.jobs} --threads {args.threads}`), training code of commit {code}, report rendered at "
        f"commit {commit}, on {cpu_model()} ({os.cpu_count()} cores, "
        f"no GPU), torch {torch.__version__}. Train s / epoch is the training pass alone at {args.threads} thread(s), "
        f"{args.jobs} runs at a time. Per-run metrics: `{args.output}/*/metrics.jsonl`; the numbers above: "
        "`docs/study_depth.json`.",
        "",
    ]
    path = docs / "study.md"
    section = "\n".join(lines) + f"\n{FINDINGS_BEGIN}\n{kept_findings(path)}\n{FINDINGS_END}\n"
    write_marked_section(path, section, BEGIN, END)
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/study_depth")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train-subset", type=int, default=2000, help="training images per seed (the pilot at 5,000 was run with --train-subset 5000)")
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["off", "linear-0.5"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_run_options(parser, "only re-render the report from finished runs")
    parser.add_argument("--pilot", action="store_true", help="train only the deepest SLWS-off run of the first seed")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where study.md, study_depth.png/.json go")
    parser.add_argument("--pilots", nargs="*", default=[], metavar="DIR",
                        help="output folders of earlier --pilot runs (other subsets) to summarise in the report")
    args = parser.parse_args(argv)
    if "off" not in args.settings:
        parser.error("--settings must include off (every difference is paired against it)")
    os.makedirs(args.output, exist_ok=True)

    if args.background:
        return run_in_background(__file__, argv, args.output, "depth study")

    if not args.report:
        todo = jobs(args)[:1] if args.pilot else jobs(args)
        minutes = train_all(args.output, args.jobs, run_one, [(args, *job) for job in todo])
        if minutes is None:
            return 1
        print(f"[study-depth] {len(todo)} runs finished in {minutes:.1f} min", flush=True)
        if args.pilot:
            depth, setting, seed = todo[0]
            r = loss_rise(read_rows(os.path.join(args.output, run_name(depth, setting, seed))))
            print(f"pilot {run_name(depth, setting, seed)}: held-out loss lowest at epoch {r['min_epoch']} "
                  f"({r['min_loss']:.4f}), final {r['final_loss']:.4f}: "
                  + (f"it rises by more than {RISE_THRESHOLD:.0%}, so there is overfitting for SLWS to act on"
                     if overfits(r) else
                     f"it does not rise by more than {RISE_THRESHOLD:.0%}: no overfitting; shrink --train-subset until it does"))
            return 0
    torch.set_num_threads(os.cpu_count() or 1)
    print(write_report(args, collect(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
