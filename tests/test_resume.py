"""Exact resume: a run killed (SIGKILL after a step checkpoint, SIGTERM mid-epoch, SIGKILL inside a
checkpoint write) and resumed ends with the same weights, bit for bit, as the run never stopped.

Every run is a subprocess with one thread, so the reference and the resumed runs compute the same
floating-point operations. Faults are injected through ``SHUFFLEMAMBA_TEST_FAULTS`` (tests/faults.py), by running
``tests/fault_runner.py`` where a user would run ``python -m shufflemamba``.
The recipe uses every source of randomness we checkpoint: augmentation (RandAugment, erasing),
mixup, SLWS, drop path, EMA.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import shufflemamba  # noqa: F401  (torchvision shim first)
from shufflemamba.training.checkpointing import load_checkpoint, step_checkpoints
from test_train import TINY_MODEL, make_folder

EPOCHS = 2
BATCHES = 6  # per epoch: 3 classes x 16 images / batch 8
RECIPE = ["--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--mixup", "0.2", "--drop-path", "0.1", "--model-ema",
          "--model-ema-decay", "0.9", "--checkpoint-every", "0"]


def args(data: str, out: str, *extra: str) -> list[str]:
    return ["train", "--data-dir", data, *TINY_MODEL, "--img-size", "16", "--batch-size", "8", "--epochs", str(EPOCHS),
            "--workers", "0", "--output", out, "--lr", "1e-3", "--scale-lr", "false", "--warmup-epochs", "0.5",
            "--slws-rate", "0.5", "--seed", "3", *RECIPE, *extra]


def env(faults: str = "") -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("SHUFFLEMAMBA_TEST_FAULTS", None)
    if faults:
        e["SHUFFLEMAMBA_TEST_FAULTS"] = faults
    return e


RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_runner.py")  # the command, with faults


def run(argv: list[str], faults: str = "", torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    return subprocess.run([*launcher, RUNNER, *argv], env=env(faults), capture_output=True, text=True, timeout=300)


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(out: str, ref: str) -> None:
    """Same final weights, EMA and optimiser state; every epoch once with the same numbers."""
    a = load_checkpoint(os.path.join(out, "last.pt"))
    b = load_checkpoint(os.path.join(ref, "last.pt"))
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["num_updates"] == b["num_updates"] == EPOCHS * BATCHES
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    rows, ref_rows = metrics(out), metrics(ref)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    for r, q in zip(rows, ref_rows):
        for key in ("train_loss", "val_loss", "val_top1", "lr", "ema_top1"):
            assert r[key] == q[key], (key, r[key], q[key])
    assert [r["epoch"] for r in a["progress"]["history"]] == list(range(EPOCHS))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("imgs")))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "run")
    res = run(args(data, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference_workers(data, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref_workers") / "run")
    res = run(args(data, out, "--workers", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_after_step_checkpoint_then_resume(data, reference, tmp_path):
    rnd = random.Random(11)
    epoch = rnd.randrange(EPOCHS)
    save = epoch * BATCHES + rnd.randint(3, BATCHES - 2)  # a step checkpoint after this update ...
    kill = rnd.randint(save + 1, (epoch + 1) * BATCHES - 1)  # ... and SIGKILL later in the same epoch
    out = str(tmp_path / "run")
    res = run(args(data, out, "--keep-last", "2"), faults=f"save={save - 2},{save - 1},{save} kill={kill}")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    # --keep-last 2: the two newest step checkpoints, both loadable with weights_only=True
    steps = step_checkpoints(out)
    assert [os.path.basename(p) for p in steps] == [f"step_{save - 1:08d}.pt", f"step_{save:08d}.pt"]
    for p in steps:
        torch.load(p, map_location="cpu", weights_only=True)
    ck = load_checkpoint(out)  # a run folder means its newest checkpoint
    assert (ck["progress"]["epoch"], ck["progress"]["batches_done"]) == (epoch, save - epoch * BATCHES)
    assert len(metrics(out)) == epoch  # the killed run's rows so far (finished epochs only)
    res = run(["train", "--resume", out])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming epoch {epoch} at batch {save - epoch * BATCHES}" in res.stdout
    assert_same_run(out, reference)
    assert step_checkpoints(out) == []  # finished epochs drop their step files


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_with_workers(data, reference_workers, tmp_path):
    """SIGTERM saves at the next step and exits 143. With 2 loader workers, which restart on the
    resume, augmentation still matches the uninterrupted run: it is seeded per sample there."""
    out = str(tmp_path / "run")
    res = run(args(data, out, "--workers", "2"), faults=f"sigterm={BATCHES + 2}")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "stopped by SIGTERM at epoch 1, batch 3 of 6" in res.stdout
    assert [os.path.basename(p) for p in step_checkpoints(out)] == [f"step_{BATCHES + 3:08d}.pt"]
    res = run(["train", "--resume", out])
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(out, reference_workers)


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous(data, reference, tmp_path):
    """Writes: last.pt (epoch 0), best.pt (epoch 0), last.pt (epoch 1), ... The third pauses after
    writing its temp file; SIGKILL there leaves epoch 0's last.pt whole, and the resume is exact."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, RUNNER, *args(data, out)], env=env("pause_save=3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    paused = os.path.join(out, "PAUSED")
    deadline = time.time() + 240
    while not os.path.exists(paused) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(paused), proc.stderr.read() if proc.poll() is not None else "timed out"
    proc.kill()
    proc.wait(timeout=60)
    assert os.path.getsize(os.path.join(out, "last.pt.tmp")) > 0  # the interrupted write
    ck = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0 and ck["progress"]["epoch"] == 1
    res = run(["train", "--resume", os.path.join(out, "last.pt")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "last.pt.tmp"))
    assert_same_run(out, reference)


@pytest.mark.slow
def test_torchrun_two_processes_sigterm_and_sigkill_then_resume(data, tmp_path):
    """Under torchrun (2 CPU processes): a SIGTERM to rank 1 alone stops both ranks at the same step
    with one step checkpoint; a later SIGKILL of rank 0 loses only what followed the next one."""
    ref = str(tmp_path / "ref")
    res = run(args(data, ref, "--batch-size", "4"), torchrun=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = str(tmp_path / "run")
    res = run(args(data, out, "--batch-size", "4"), faults="sigterm=2 rank=1", torchrun=True)
    assert res.returncode != 0
    assert "stopped by SIGTERM at epoch 0, batch 3 of 6" in res.stdout, res.stdout + res.stderr[-3000:]
    ck = load_checkpoint(out)
    assert len(ck["rng"]) == 2 and len(ck["rank_sums"]) == 2 and ck["progress"]["batches_done"] == 3
    res = run(["train", "--resume", out], faults=f"save={BATCHES + 2} kill={BATCHES + 4} rank=0", torchrun=True)
    assert res.returncode != 0
    assert load_checkpoint(out)["progress"]["batches_done"] == 2  # epoch 1's step checkpoint
    res = run(["train", "--resume", out], torchrun=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(out, ref)


@pytest.mark.slow
def test_torchrun_a_rank_with_an_empty_batch_does_not_hang(data, tmp_path):
    """Under torchrun (2 CPU processes): when every image of one rank's micro-batch was unreadable, that
    rank has nothing to run; both ranks drop the step together (a warning says so) instead of the
    other one waiting forever in the gradient all-reduce."""
    out = str(tmp_path / "run")
    res = run(args(data, out, "--batch-size", "4"), faults="empty=2 rank=1", torchrun=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "epoch 0 step 2: a process had no readable images; step skipped on every process" in res.stdout
    assert [m["epoch"] for m in metrics(out)] == list(range(EPOCHS))


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory, make_fashion_idx) -> str:
    """A 48-image Fashion-MNIST in IDX files: the batched augmentation path (batch_aug.py)."""
    return make_fashion_idx(tmp_path_factory.mktemp("idx"), 48, 16, 3)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_batched_fashion_mnist_augmentation_resumes_exactly(idx_data, workers, tmp_path):
    """The default crop / flip recipe on Fashion-MNIST runs through the batched transform; a run
    stopped mid-epoch (SIGTERM) and resumed matches the uninterrupted one, in the main process
    (global generators, checkpointed) and in restarted workers (seeded per batch)."""
    def argv(out: str) -> list[str]:
        base = args(idx_data, out, "--workers", workers)
        recipe = base.index("--aa")  # RandAugment and erasing would send it down timm's per-sample path
        base[recipe:recipe + 4] = []
        return [*base, "--dataset", "fashion-mnist"]

    ref = str(tmp_path / "ref")
    res = run(argv(ref))
    assert res.returncode == 0, res.stderr[-3000:]
    out = str(tmp_path / "run")
    res = run(argv(out), faults=f"sigterm={BATCHES + 2}")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    res = run(["train", "--resume", out])
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(out, ref)
