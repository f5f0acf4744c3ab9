"""End-to-end training tests on a tiny generated ImageFolder with a tiny Vim (16x16 images, 16 tokens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import shufflemamba  # noqa: F401  (torchvision shim first)
from shufflemamba.cli import main
from shufflemamba.training.config import resolve_config
from shufflemamba.training.engine import NonFiniteLossError, StepState, train_one_epoch

TINY_MODEL = ["--model", "vim_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=2", "d_state=4"]


def make_folder(root: str, n_train: int = 16, n_val: int = 8, classes: int = 3, size: int = 16) -> str:
    """Classes differ in brightness, so a tiny model learns them in a few steps."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(a).save(os.path.join(d, f"{i}.png"))
    return root


def train_args(data: str, out: str, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data-dir", data, *TINY_MODEL, "--img-size", "16", "--batch-size", "8", "--epochs", str(epochs),
            "--workers", "0", "--output", out, "--lr", "1e-3", "--scale-lr", "false", "--warmup-epochs", "0.5",
            "--slws-rate", "0.5", "--seed", "3", *extra]


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def env1() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("imgs")))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_then_eval_agree(data, tmp_path, capsys, one_thread):
    out = str(tmp_path / "run")
    assert main(train_args(data, out, 2, "--model-ema", "--model-ema-decay", "0.9")) == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds", "images_per_second", "ema_top1"):
        assert key in rows[-1] and np.isfinite(rows[-1][key])
    for name in ("last.pt", "best.pt", "config.yaml", "curves.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_name"] == "vim_tiny_patch16_224"
    assert ckpt["model_kwargs"]["embed_dim"] == 16 and ckpt["model_kwargs"]["slws_rate"] == 0.5
    assert ckpt["model_ema"] is not None and ckpt["optimizer"]["state"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", os.path.join(out, "last.pt"), "--data-dir", data, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 24
    assert res["top1"] == pytest.approx(rows[-1]["val_top1"])
    assert res["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", os.path.join(out, "last.pt"), "--data-dir", data, "--json", "--ema"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["top1"] == pytest.approx(rows[-1]["ema_top1"])


def test_sigterm_then_resume_is_exact(data, tmp_path, one_thread):
    epochs = 6
    ref = str(tmp_path / "ref")
    assert main(train_args(data, ref, epochs)) == 0
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "shufflemamba", *train_args(data, out, epochs)]
    proc = subprocess.Popen(cmd, env=env1(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = os.path.join(out, "last.pt")
    deadline = time.time() + 120
    while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stdout
    done = read_metrics(out)
    assert 1 <= len(done) < epochs
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == len(done) - 1
    # resume from the checkpoint alone: its config is the default
    res = subprocess.run([sys.executable, "-m", "shufflemamba", "train", "--resume", last], env=env1(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(epochs))  # every epoch exactly once
    for a, b in zip(rows, read_metrics(ref)):  # same numbers as the uninterrupted run
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)
        assert a["val_top1"] == pytest.approx(b["val_top1"])


def test_torchrun_two_cpu_processes(data, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shufflemamba", *train_args(data, out, 1)]
    res = subprocess.run(cmd, env=env1(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "x2" in res.stdout
    rows = read_metrics(out)
    assert len(rows) == 1  # rank 0 only writes
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert len(ckpt["rng"]) == 2


class _NaNModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1)[:, :3] * self.w) * float("nan")


def test_nonfinite_losses_skip_then_stop():
    cfg = resolve_config(None, {"max_nonfinite": 3, "log_interval": 100})
    model = _NaNModel()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = [(torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,)), 0) for _ in range(5)]
    msgs: list[str] = []
    state = StepState(log=msgs.append)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train_one_epoch(model, batches, opt, torch.nn.CrossEntropyLoss(), 0, cfg, torch.device("cpu"), state)
    skipped = [m for m in msgs if "step skipped" in m]
    assert len(skipped) == 3 and skipped[0].startswith("warning: non-finite loss at epoch 0 step 0")
    assert state.num_updates == 0 and model.w.item() == 1.0  # no step taken on a NaN loss


def test_a_short_epoch_logs_its_progress_with_an_eta():
    """Without a terminal, plain lines: every log_interval batches, and at least 4 an epoch."""
    from shufflemamba.training.progress import EpochProgress, duration

    lines: list[str] = []
    report = EpochProgress(epoch=2, n_batches=8, start=0, log_interval=100, log=lines.append)
    for done in range(1, 9):
        report.update(done, loss=0.5, lr=1e-3, images_per_second=10.0)
    report.close()
    assert [line.split("]")[0] for line in lines] == [f"epoch 2 [{n}/8" for n in (2, 4, 6, 8)]
    assert all(" eta " in line and "img/s" in line for line in lines)
    lines.clear()
    long = EpochProgress(epoch=0, n_batches=1000, start=400, log_interval=50, log=lines.append)
    for done in range(401, 501):
        long.update(done, loss=0.5, lr=1e-3, images_per_second=10.0)
    assert [line.split("]")[0] for line in lines] == ["epoch 0 [450/1000", "epoch 0 [500/1000"]
    assert [duration(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
