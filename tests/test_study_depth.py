"""The depth study's arithmetic (benchmarks/study_depth.py): pairing, standard errors, calls, pilot."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def sd():
    sys.path.insert(0, str(BENCH))  # study_depth imports its sibling study.py
    try:
        spec = importlib.util.spec_from_file_location("study_depth", BENCH / "study_depth.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _run(depth, setting, seed, top1):
    return {"depth": depth, "setting": setting, "seed": seed, "test_top1": top1}


def test_paired_differences_match_seeds_and_skip_unpaired(sd):
    runs = [
        _run(6, "off", 0, 80.0), _run(6, "linear-0.5", 0, 81.5),
        _run(6, "off", 1, 79.0), _run(6, "linear-0.5", 1, 78.0),
        _run(6, "linear-0.5", 2, 90.0),  # no off run for seed 2: not paired
        _run(24, "off", 0, 70.0), _run(24, "linear-0.5", 0, 75.0),
    ]
    assert sd.paired(runs, 6, "linear-0.5") == {0: pytest.approx(1.5), 1: pytest.approx(-1.0)}
    assert sd.paired(runs, 24, "linear-0.5") == {0: pytest.approx(5.0)}


def test_mean_se_and_the_two_se_call(sd):
    m, se = sd.mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    assert sd.verdict(2.0, 1.0 / math.sqrt(3)).startswith("effect")
    assert sd.verdict(1.0, 0.6).startswith("no call")
    assert sd.verdict(-1.3, 0.6).startswith("effect")  # negative effects are called too
    assert math.isnan(sd.mean_se([4.0])[1]) and sd.verdict(4.0, float("nan")).startswith("one seed")


def test_loss_rise_finds_the_minimum_and_the_climb(sd):
    rows = [{"val_loss": v} for v in (1.0, 0.6, 0.5, 0.55, 0.7)]
    assert sd.loss_rise(rows) == {"min_epoch": 3, "min_loss": 0.5, "final_loss": 0.7, "rise": pytest.approx(0.2)}
    falling = [{"val_loss": v} for v in (1.0, 0.8, 0.7)]
    assert sd.loss_rise(falling)["rise"] == 0.0 and sd.loss_rise(falling)["min_epoch"] == 3
    assert sd.overfits(sd.loss_rise(rows)) and not sd.overfits(sd.loss_rise(falling))
    noisy = [{"val_loss": v} for v in (1.0, 0.64, 0.66, 0.6475)]  # ends 1.2% above its minimum: noise
    assert not sd.overfits(sd.loss_rise(noisy))


def test_jobs_start_with_the_pilot_and_go_seed_by_seed(sd):
    args = type("A", (), {"depths": [6, 24], "settings": ["off", "linear-0.5"], "seeds": [0, 1]})()
    order = sd.jobs(args)
    assert order[0] == (24, "off", 0)  # the deepest SLWS-off run is the pilot
    assert [seed for _, _, seed in order] == [0] * 4 + [1] * 4


def test_train_all_runs_every_job_and_keeps_the_folder_locked(sd, tmp_path, capsys):
    """Both studies train through study.train_all: every job runs, and the folder's lock stays held
    afterwards (a second study in the same folder is refused with one error line)."""
    import study

    done = []
    minutes = sd.train_all(str(tmp_path), 2, lambda a, b: done.append((a, b)), [(1, "x"), (2, "y"), (3, "z")])
    try:
        assert minutes is not None and minutes >= 0 and sorted(done) == [(1, "x"), (2, "y"), (3, "z")]
        assert sd.train_all(str(tmp_path), 1, lambda: None, [()]) is None
        assert "a study is already running" in capsys.readouterr().err
    finally:
        for lock in study._HELD_LOCKS:
            lock.close()
        study._HELD_LOCKS.clear()
