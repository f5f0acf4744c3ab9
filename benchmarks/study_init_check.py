"""Does the SLWS study's finding survive another model initialisation?

The published study (docs/study.md) ran with Mamba's dt init in both directions (``init: mamba``,
pinned in study.yaml as ``dt_init_b: mamba``). This re-runs two of its settings, SLWS off and
linear 0.5, three seeds each, with everything the same except ``--init`` ("vim": official Vim, zero
dt_proj_b bias; "shufflemamba": ShuffleMamba's models_shuffle.py, every Linear trunc-normal 0.02
with zero biases and a zero class token), and evaluates them exactly as the study does (final
weights on the run's training subset and on the full test set). Writes docs/study_init_check.json
(init vim) or docs/study_init_check_<init>.json and prints a table next to the published numbers
(and the other inits' numbers already written) for the same settings.

    python benchmarks/study_init_check.py --init vim            # ~20 min on 2 cores
    python benchmarks/study_init_check.py --init shufflemamba
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


def _json_name(init: str) -> str:
    return "study_init_check.json" if init == "vim" else f"study_init_check_{init}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", choices=("vim", "shufflemamba"), default="vim")
    parser.add_argument("--output", default=None, help="run folder (default runs/study_init_<init>)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.output = args.output or f"runs/study_init_{args.init}"
    os.makedirs(args.output, exist_ok=True)

    base_args = study.train_args
    # the study's command line plus the one difference under test; "dt_init_b=" (None) drops the
    # recipe's deprecated dt_init_b: mamba, which would otherwise win over init
    study.train_args = lambda a, rate, sched, seed, out: [*base_args(a, rate, sched, seed, out),
                                                          "--model-kwargs", "dt_init_b=", f"init={args.init}"]
    jobs = [(name, rate, sched, seed) for seed in study.SEEDS for name, rate, sched in SETTINGS]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: study.run_one(args, *j), jobs))

    docs = os.path.join(study.ROOT, "docs")
    published = {r["setting"]: r for r in json.load(open(os.path.join(docs, "study.json")))["results"]}
    others = {}  # init -> {setting: runs} from earlier checks
    for other in ("vim", "shufflemamba"):
        path = os.path.join(docs, _json_name(other))
        if other != args.init and os.path.exists(path):
            others[other] = {r["setting"]: r["runs"] for r in json.load(open(path))["results"]}
    rows = []
    for name, _, _ in SETTINGS:
        runs = []
        for seed in study.SEEDS:
            train_eval, test_eval = study.final_accuracy(os.path.join(args.output, f"{name}-s{seed}"))
            runs.append({"seed": seed, "test_top1": test_eval["top1"], "test_loss": test_eval["loss"],
                         "gap": train_eval["top1"] - test_eval["top1"]})
        rows.append({"setting": name, "init": args.init, "runs": runs})
        table = [(args.init, runs), *((k, v[name]) for k, v in others.items()), ("mamba (published)",
                                                                                  published[name]["runs"])]
        for init, rs in table:
            print(f"{name:12s} init={init:18s} test top-1 {study._mean_sd([r['test_top1'] for r in rs])}"
                  f"  gap {study._mean_sd([r['gap'] for r in rs])}"
                  f"  test loss {statistics.mean(r['test_loss'] for r in rs):.3f}")
    with open(os.path.join(docs, _json_name(args.init)), "w", encoding="utf-8") as f:
        json.dump({"epochs": args.epochs, "train_subset": args.train_subset, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
