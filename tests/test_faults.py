"""Faults, in one process: safe checkpoint loading, bad checkpoints and output folders, a full disk,
non-finite losses. Each ends in one ``error:`` line and a non-zero exit, or in a loadable checkpoint.
"""

from __future__ import annotations

import ast
import errno
import inspect
import os
import shutil
import signal

import pytest
import torch

import shufflemamba  # noqa: F401  (torchvision shim first)
from shufflemamba.bench import suite as bench
from shufflemamba.training.checkpointing import TRUST_ENV, load_checkpoint, step_checkpoints
from shufflemamba.cli import main
from shufflemamba.errors import UserError
from faults import Faults, install
from test_train import make_folder, read_metrics, train_args


class Foreign:
    """A pickled object of a class no allowlist knows (what a foreign checkpoint may hold)."""


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("imgs")))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def set_faults(monkeypatch, **kw) -> None:
    install(Faults(**{k: frozenset(v) for k, v in kw.items()}), monkeypatch.setattr)


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory) -> str:
    """Two epochs planned; SIGTERM after update 8: last.pt / best.pt of epoch 0 and step_9.pt."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    mp = pytest.MonkeyPatch()
    install(Faults(sigterm=frozenset({8})), mp.setattr)
    try:
        assert main(train_args(data, out, 2, "--model-ema")) == 128 + signal.SIGTERM
    finally:
        mp.undo()
    shutil.copy(os.path.join(out, "step_00000009.pt"), out + "_step9.pt")  # a copy that later tests keep
    return out


def test_our_checkpoints_load_with_weights_only(stopped_run):
    names = sorted(os.listdir(stopped_run))
    assert {"last.pt", "best.pt", "step_00000009.pt"} <= set(names), names
    for name in ("last.pt", "best.pt", "step_00000009.pt"):
        ck = torch.load(os.path.join(stopped_run, name), map_location="cpu", weights_only=True)
        assert ck["version"] == 2 and isinstance(ck["config"], dict) and len(ck["rng"]) == 1
        assert isinstance(ck["rng"][0]["numpy"]["state"], torch.Tensor)
    step = load_checkpoint(os.path.join(stopped_run, "step_00000009.pt"))
    assert (step["progress"]["epoch"], step["progress"]["batches_done"], step["num_updates"]) == (1, 3, 9)
    assert step["rank_sums"][0]["loss_count"] == 3 and [r["epoch"] for r in step["progress"]["history"]] == [0]


def test_bad_checkpoints_are_one_line_errors(stopped_run, data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    good = open(os.path.join(stopped_run, "last.pt"), "rb").read()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": {}, "extra": Foreign()}, tmp_path / "foreign.pt")
    cases = [("empty.pt", "is empty"), ("truncated.pt", "could not be read"), ("junk.pt", "could not be read"),
             ("foreign.pt", "--trust-checkpoint")]
    for name, needle in cases:
        path = str(tmp_path / name)
        assert_one_error(*run_main(["train", "--resume", path], capsys)[::2], needle)
        assert_one_error(*run_main(["eval", "--checkpoint", path, "--data-dir", data], capsys)[::2], needle)
    assert_one_error(*run_main(["train", "--resume", str(tmp_path)], capsys)[::2], "holds no checkpoint")
    # opting in loads the foreign file (it then fails for holding no weights, not for its pickle)
    assert isinstance(load_checkpoint(str(tmp_path / "foreign.pt"), trust=True)["extra"], Foreign)
    code, _, err = run_main(["eval", "--checkpoint", str(tmp_path / "foreign.pt"), "--data-dir", data, "--trust-checkpoint"], capsys)
    assert_one_error(code, err)
    assert "--trust-checkpoint" not in err
    monkeypatch.delenv(TRUST_ENV, raising=False)  # --trust-checkpoint set it for this process


def test_resume_from_folder_continues_step_checkpoint(stopped_run, capsys):
    code, out, err = run_main(["train", "--resume", stopped_run], capsys)
    assert code == 0, err
    assert "resuming epoch 1 at batch 3" in out
    assert [r["epoch"] for r in read_metrics(stopped_run)] == [0, 1]
    assert step_checkpoints(stopped_run) == []


def test_unwritable_output(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (str(blocker), str(blocker / "sub")):
        assert_one_error(*run_main(train_args(data, out, 1), capsys)[::2], "cannot write to output folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert_one_error(*run_main(train_args(data, str(ro), 1), capsys)[::2], "cannot write to output folder")


def test_disk_full_during_save_keeps_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    real_save, calls, before = torch.save, [], {}

    def full_disk(obj, f, *a, **kw):  # the third write (epoch 1's last.pt) runs out of space
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, f, *a, **kw)
        before["last"] = open(os.path.join(out, "last.pt"), "rb").read()
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_main(train_args(data, out, 2), capsys)
    assert_one_error(code, err, "disk full", "last.pt", "untouched")
    assert open(os.path.join(out, "last.pt"), "rb").read() == before["last"]
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 0
    assert not os.path.exists(os.path.join(out, "last.pt.tmp"))


def test_nonfinite_loss_is_skipped_and_counted(data, tmp_path, capsys, monkeypatch):
    set_faults(monkeypatch, nan={3})
    out = str(tmp_path / "run")
    code, stdout, err = run_main(train_args(data, out, 1), capsys)
    assert code == 0, err
    assert "non-finite loss at epoch 0 step 3; step skipped (1 in a row)" in stdout
    assert read_metrics(out)[0]["nonfinite_steps"] == 1
    assert load_checkpoint(os.path.join(out, "last.pt"))["num_updates"] == 5  # 6 batches, one skipped


def test_nonfinite_streak_stops_with_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    """Batches 2-5 of epoch 0 and 0 of epoch 1 are NaN: 5 in a row (max_nonfinite) across an epoch end."""
    set_faults(monkeypatch, nan={2, 3, 4, 5, 6})
    out = str(tmp_path / "run")
    code, _, err = run_main(train_args(data, out, 2), capsys)
    path = os.path.join(out, "step_00000002.pt")
    assert_one_error(code, err, "5 non-finite losses in a row at epoch 1", f"last good state is in {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert (ck["progress"]["epoch"], ck["progress"]["batches_done"], ck["num_updates"]) == (1, 1, 2)
    assert all(int(s["step"]) == 2 for s in ck["optimizer"]["state"].values())  # two good updates, no more
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
    monkeypatch.undo()  # no more faults
    code, _, err = run_main(["train", "--resume", out], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


def test_step_checkpoint_options_are_validated(data, capsys):
    assert_one_error(*run_main(train_args(data, "unused", 1, "--keep-last", "0"), capsys)[::2], "keep_last")
    assert_one_error(*run_main(train_args(data, "unused", 1, "--checkpoint-every", "-1"), capsys)[::2], "checkpoint_every")


def test_bench_does_not_import_cli():
    """cli.py imports bench.py (for `shufflemamba bench`); the reverse would be an import circle."""
    tree = ast.parse(inspect.getsource(bench))
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and n.endswith("cli")], names


def test_user_error_from_load_is_not_a_traceback(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_version1_checkpoint_resumes_only_when_trusted(stopped_run, tmp_path, capsys, monkeypatch):
    """Checkpoints written before step checkpoints pickled numpy's RNG state: refused by default,
    resumed (from the next epoch) with --trust-checkpoint."""
    import numpy as np

    monkeypatch.delenv(TRUST_ENV, raising=False)
    ck = load_checkpoint(os.path.join(stopped_run, "last.pt"))
    for key in ("progress", "rank_sums", "metrics"):
        ck.pop(key)
    ck["version"] = 1
    rng = ck["rng"][0]
    npst = rng["numpy"]
    rng["numpy"] = (npst["key"], npst["state"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    rng["python"] = (rng["python"]["version"], tuple(rng["python"]["state"].tolist()), rng["python"]["gauss_next"])
    old = str(tmp_path / "v1.pt")
    torch.save(ck, old)
    argv = ["train", "--resume", old, "--output", str(tmp_path / "continued"), "--epochs", str(ck["epoch"] + 2)]
    assert_one_error(*run_main(argv, capsys)[::2], "--trust-checkpoint")
    code, stdout, err = run_main([*argv, "--trust-checkpoint"], capsys)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    assert code == 0, err
    nxt = ck["epoch"] + 1
    assert f"epochs {nxt}..{nxt}" in stdout and [r["epoch"] for r in read_metrics(str(tmp_path / "continued"))] == [nxt]


def test_step_checkpoint_from_another_world_size_restarts_its_epoch(stopped_run, tmp_path, capsys):
    """Another process count shards the epoch differently: the position is meaningless, so the
    interrupted epoch restarts from its first batch (schedule and weights continue)."""
    ck = load_checkpoint(stopped_run + "_step9.pt")
    ck["rng"] = ck["rng"] * 2
    ck["rank_sums"] = ck["rank_sums"] * 2
    path = str(tmp_path / "two_ranks.pt")
    torch.save(ck, path)
    code, stdout, err = run_main(["train", "--resume", path, "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "written by 2 processes, resumed on 1; epoch 1 restarts from its first batch" in stdout
    assert load_checkpoint(str(tmp_path / "out" / "last.pt"))["num_updates"] == 9 + 6


def test_accumulation_resume_in_process_is_exact(data, tmp_path, capsys, monkeypatch):
    """--accum-steps 2: a stop waits for the end of the accumulation group, and the resumed run
    (here in the same process) ends with the weights of the uninterrupted one."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    assert run_main(train_args(data, ref, 2, "--accum-steps", "2"), capsys)[0] == 0
    set_faults(monkeypatch, sigterm={4})  # after update 4 = epoch 1, micro-batch 1
    code, stdout, _ = run_main(train_args(data, out, 2, "--accum-steps", "2"), capsys)
    assert code == 128 + signal.SIGTERM and "at epoch 1, batch 4 of 6" in stdout
    monkeypatch.undo()  # no more faults
    assert run_main(["train", "--resume", out], capsys)[0] == 0
    a, b = load_checkpoint(os.path.join(out, "last.pt")), load_checkpoint(os.path.join(ref, "last.pt"))
    assert a["num_updates"] == b["num_updates"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_clock_checkpoints_keep_last_and_sigusr1(data, tmp_path, capsys, monkeypatch):
    """A tiny --checkpoint-every makes every update due: step files rotate down to --keep-last;
    SIGUSR1 (SLURM's warning signal) saves and stops like SIGTERM."""
    set_faults(monkeypatch, sigusr1={3})
    out = str(tmp_path / "run")
    code, stdout, _ = run_main(train_args(data, out, 1, "--checkpoint-every", "1e-9", "--keep-last", "2"), capsys)
    assert code == 128 + signal.SIGUSR1 and "stopped by SIGUSR1 at epoch 0, batch 4 of 6" in stdout
    assert [os.path.basename(p) for p in step_checkpoints(out)] == ["step_00000003.pt", "step_00000004.pt"]


def test_signal_at_an_epoch_end_stops_after_its_checkpoint(data, tmp_path, capsys, monkeypatch):
    """SIGTERM right after an epoch's last update: the epoch is evaluated and saved, then the run
    stops without a step checkpoint; during the last epoch's end it just finishes."""
    set_faults(monkeypatch, sigterm={6})
    out = str(tmp_path / "run")
    code, stdout, _ = run_main(train_args(data, out, 2), capsys)
    assert code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM after epoch 0; saved {os.path.join(out, 'last.pt')}" in stdout
    assert step_checkpoints(out) == [] and [r["epoch"] for r in read_metrics(out)] == [0]
    code, stdout, _ = run_main(train_args(data, str(tmp_path / "one"), 1), capsys)
    assert code == 0 and "final test top-1" in stdout
