"""Does the SLWS study's finding survive Vim's own dt_proj_b initialisation?

The published study (docs/study.md) ran with ``dt_init_b: mamba``. This re-runs two of its settings,
SLWS off and linear 0.5, three seeds each, with everything the same except ``dt_init_b=vim`` (the
package default: zero dt_proj_b bias), and evaluates them exactly as the study does (final weights
on the run's training subset and on the full test set). Writes docs/study_init_check.json and prints
a table next to the published numbers for the same settings.

    python benchmarks/study_init_check.py --output runs/study_init_vim   # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402  (the study's own run and evaluation code)

SETTINGS = [s for s in study.SETTINGS if s[0] in ("off", "linear-0.5")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/study_init_vim")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)

    base_args = study.train_args
    # the study's command line plus the one difference under test
    study.train_args = lambda a, rate, sched, seed, out: [*base_args(a, rate, sched, seed, out),
                                                          "--model-kwargs", "dt_init_b=vim"]
    jobs = [(name, rate, sched, seed) for seed in study.SEEDS for name, rate, sched in SETTINGS]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: study.run_one(args, *j), jobs))

    published = {r["setting"]: r for r in json.load(open(os.path.join(study.ROOT, "docs", "study.json")))["results"]}
    rows = []
    for name, _, _ in SETTINGS:
        runs = []
        for seed in study.SEEDS:
            train_eval, test_eval = study.final_accuracy(os.path.join(args.output, f"{name}-s{seed}"))
            runs.append({"seed": seed, "test_top1": test_eval["top1"], "test_loss": test_eval["loss"],
                         "gap": train_eval["top1"] - test_eval["top1"]})
        rows.append({"setting": name, "dt_init_b": "vim", "runs": runs})
        for init, rs in (("vim", runs), ("mamba (published)", published[name]["runs"])):
            print(f"{name:12s} dt_init_b={init:18s} test top-1 {study._mean_sd([r['test_top1'] for r in rs])}"
                  f"  gap {study._mean_sd([r['gap'] for r in rs])}"
                  f"  test loss {statistics.mean(r['test_loss'] for r in rs):.3f}")
    with open(os.path.join(study.ROOT, "docs", "study_init_check.json"), "w", encoding="utf-8") as f:
        json.dump({"epochs": args.epochs, "train_subset": args.train_subset, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
