"""The command line: bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import shufflemamba  # noqa: F401
from shufflemamba.cli import main

TINY_KW = {"patch_size": 4, "embed_dim": 16, "depth": 1, "d_state": 4, "img_size": 16, "num_classes": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("cli_imgs"))
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(2):
                Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(os.path.join(root, split, c, f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    import timm

    model = timm.create_model("vim_tiny_patch16_224", **TINY_KW)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    torch.save({"model": model.state_dict(), "model_name": "vim_tiny_patch16_224", "model_kwargs": TINY_KW}, path)
    return path


def run_main(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def tiny_train(data: str, *extra: str) -> list[str]:
    return ["train", "--data-dir", data, "--model", "vim_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=16",
            "depth=1", "d_state=4", "--img-size", "16", "--batch-size", "2", "--epochs", "1", "--workers", "0", *extra]


def test_missing_and_empty_data_dir(tmp_path, capsys):
    assert_one_line_error(*run_main(tiny_train(str(tmp_path / "nope")), capsys), "does not exist")
    os.makedirs(tmp_path / "empty" / "train")
    os.makedirs(tmp_path / "empty" / "val" / "cls")
    assert_one_line_error(*run_main(tiny_train(str(tmp_path / "empty")), capsys), "has no images")
    assert_one_line_error(*run_main(["train", "--model", "vim_tiny_patch16_224"], capsys), "--data-dir")


def test_class_mismatch(tmp_path, capsys):
    for split, cls in (("train", "a"), ("val", "b")):
        os.makedirs(tmp_path / split / cls)
        Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "x.png")
    assert_one_line_error(*run_main(tiny_train(str(tmp_path)), capsys), "class folders differ")


def test_unknown_model_suggests_close_names(data, capsys):
    argv = tiny_train(data)
    argv[argv.index("vim_tiny_patch16_224")] = "vim_tiny_patch16_22"
    assert_one_line_error(*run_main(argv, capsys), "unknown model 'vim_tiny_patch16_22'", "did you mean", "vim_tiny_patch16_224")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--epochs", "-3"], "epochs must be >= 1"),
        (["--slws-rate", "1.2"], "slws_rate must be in"),
        (["--ssr", "-0.5"], "slws_rate must be in"),
        (["--config", "no_such_preset"], "unknown preset"),
        (["--model-kwargs", "depth"], "malformed --model-kwargs"),
        (["--epochs", "two"], "invalid int value"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_nonsense_values(data, capsys, extra, needle):
    assert_one_line_error(*run_main(tiny_train(data) + extra, capsys), needle)


def test_checkpoint_missing_or_other_architecture(data, ckpt, tmp_path, capsys):
    assert_one_line_error(*run_main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data-dir", data], capsys), "not found")
    assert_one_line_error(*run_main(["eval", "--checkpoint", ckpt, "--data-dir", data, "--model", "vim_small_patch16_224"], capsys),
                          "is for model 'vim_tiny_patch16_224'")
    assert_one_line_error(*run_main(tiny_train(data, "--resume", ckpt, "--model", "vit_tiny_patch16_224"), capsys), "is for model")
    # the stored kwargs promise depth 2 but the weights hold one layer: another architecture
    bad = torch.load(ckpt, weights_only=False)
    bad["model_kwargs"] = {**TINY_KW, "depth": 2}
    torch.save(bad, tmp_path / "bad.pt")
    assert_one_line_error(*run_main(["eval", "--checkpoint", str(tmp_path / "bad.pt"), "--data-dir", data], capsys), "does not match model")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(*run_main(["eval", "--checkpoint", str(tmp_path / "junk.pt"), "--data-dir", data], capsys), "could not be read")
    assert_one_line_error(*run_main(["eval", "--checkpoint", ckpt, "--data-dir", data, "--ema"], capsys), "no EMA weights")


def test_eval_rebuilds_from_checkpoint_alone(data, ckpt, capsys):
    code = main(["eval", "--checkpoint", ckpt, "--data-dir", data, "--json", "--batch-size", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    import json

    res = json.loads(out[-1])
    assert res["images"] == 4 and 0 <= res["top1"] <= 100 and res["top5"] == 100.0 and res["loss"] > 0


def test_bench_dispatch(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("shufflemamba.bench.suite")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "shufflemamba.bench.suite", fake)
    assert main(["bench", "--quick", "x"]) == 0 and seen["argv"] == ["--quick", "x"]
    monkeypatch.setitem(sys.modules, "shufflemamba.bench.suite", None)
    assert_one_line_error(*run_main(["bench"], capsys), "shufflemamba.bench")


def test_python_m_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "shufflemamba", "train", "--data-dir", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.strip().startswith("error: ")
    assert len(res.stderr.strip().splitlines()) == 1
