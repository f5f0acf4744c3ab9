"""What a new user meets first: their own folder trains with no other flag, a run is never
overwritten, a run comes back as a model in one call, and every small rough edge of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import shufflemamba
from shufflemamba.cli import build_parser, main
from shufflemamba.training.config import AUTO_KEYS, DEFAULTS, UserError, load_config_file, resolve_config
from shufflemamba.training.defaults import fill_auto_defaults

TINY = ["--model-kwargs", "embed_dim=16", "depth=1", "d_state=4", "--workers", "0"]
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def make_folder(root, n: int = 24, size: int = 32, split: bool = False) -> str:
    """Class folders of noisy images whose class is their colour (a task any working recipe learns)."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        for i in range(n):
            sub = os.path.join(root, ("train" if i % 4 else "val") if split else "", name)
            os.makedirs(sub, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(sub, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_folder(tmp_path_factory.mktemp("my_images"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder) -> str:
    """One finished run on the flat folder, with only the size-shrinking flags a test needs."""
    out = str(tmp_path_factory.mktemp("runs") / "first")
    assert main(["train", "--data-dir", folder, "--epochs", "3", "--output", out, *TINY]) == 0
    return out


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


# --------------------------------------------------------------------------- defaults from the data


def test_defaults_come_from_the_data(folder):
    cfg = resolve_config(None, {"data_dir": folder, "epochs": 2})
    notes = fill_auto_defaults(cfg)
    assert cfg["img_size"] == 32 and cfg["model_kwargs"]["patch_size"] == 4  # 8 x 8 patches, not 2 x 2
    assert cfg["holdout"] == 7  # 10% of 72 images: the flat folder has no val/
    assert cfg["batch_size"] == 8  # 65 training images: 8 steps an epoch
    assert cfg["warmup_epochs"] == pytest.approx(0.2) and cfg["lr"] == 5e-4 and cfg["scale_lr"] is False
    assert cfg["model"] == "vim_tiny_patch16_224"
    assert len(notes) == 6 and all("(" in n for n in notes)  # each says why


def test_presets_keep_their_reference_values():
    for preset in ("demo", "shufflemamba_base_in1k", "vim_small_in1k", "reg_base_stage1"):
        cfg = resolve_config(preset, {})
        before = dict(cfg)
        assert fill_auto_defaults(cfg) == [] or cfg["dataset"] is None
        for key in ("img_size", "lr", "warmup_epochs", "batch_size", "model", "scale_lr"):
            assert cfg[key] == before[key], (preset, key)


def test_warmup_longer_than_the_run_is_named(folder):
    notes = fill_auto_defaults(resolve_config(None, {"data_dir": folder, "epochs": 2, "warmup_epochs": 5}))
    assert any(n.startswith("warning: warmup_epochs 5") for n in notes)


def test_own_folder_learns_with_no_recipe_flag(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(rows) == 3
    assert max(r["val_top1"] for r in rows) > 80.0  # chance is 33%
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    for key in ("data_dir", "output"):
        assert os.path.isabs(cfg[key]), key


def test_help_shows_every_default():
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    for action in train._actions:
        if action.dest in DEFAULTS:
            assert "default: " in (action.help or ""), action.dest
            if action.dest in AUTO_KEYS:
                assert "auto: " in action.help


# --------------------------------------------------------------------------- a run is never overwritten


def test_a_finished_run_is_not_overwritten(run, folder, capsys):
    before = {f: os.path.getmtime(os.path.join(run, f)) for f in ("last.pt", "metrics.jsonl", "config.yaml")}
    code = main(["train", "--data-dir", folder, "--epochs", "1", "--output", run, *TINY])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and captured.out == ""
    assert f"--resume {run}" in err and f"--output {run}-2" in err and "--overwrite" in err
    assert before == {f: os.path.getmtime(os.path.join(run, f)) for f in before}


def test_overwrite_replaces_the_run(tmp_path, folder):
    out = str(tmp_path / "again")
    assert main(["train", "--data-dir", folder, "--epochs", "1", "--output", out, *TINY]) == 0
    assert main(["train", "--data-dir", folder, "--epochs", "1", "--output", out, "--overwrite", *TINY,
                 "--seed", "1"]) == 0
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["seed"] == 1
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(run, folder, capsys):
    before = open(os.path.join(run, "last.pt"), "rb").read()
    code = main(["train", "--data-dir", folder, "--epochs", "1", "--output", run, "--overwrite", "--model", "no_such_model"])
    assert code == 2 and "unknown model" in _err(capsys)
    assert open(os.path.join(run, "last.pt"), "rb").read() == before


def test_default_output_is_a_new_folder(tmp_path, folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", "--data-dir", folder, "--epochs", "1", *TINY]) == 0
    made = sorted(os.listdir(tmp_path / "runs"))
    assert len(made) == 2 and all(m.startswith("vim_tiny_patch16_224-") for m in made)
    assert "run folder " + str(tmp_path / "runs" / made[-1]) in capsys.readouterr().out


def test_resume_from_another_directory(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", run, "--epochs", "4"]) == 0
    assert len(open(os.path.join(run, "metrics.jsonl")).readlines()) == 4
    capsys.readouterr()
    assert main(["train", "--resume", run]) == 0  # finished: says so, trains nothing
    out = capsys.readouterr().out
    assert "has finished its 4 epochs: nothing to train" in out and "epochs 4..3" not in out


# --------------------------------------------------------------------------- back to Python


def test_load_model_gives_the_trained_model(run):
    model = shufflemamba.load_model(run)
    assert model.classes == sorted(COLOURS) and not model.training
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["label_names"] == sorted(COLOURS)
    ckpt = torch.load(os.path.join(run, "best.pt"), weights_only=True)
    import timm

    by_timm = timm.create_model(ckpt["model_name"], checkpoint_path=os.path.join(run, "best.pt"), **ckpt["model_kwargs"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), by_timm.eval()(x))
    last = shufflemamba.load_model(os.path.join(run, "last.pt"))
    assert last.classes == model.classes


def test_load_model_errors_are_user_errors(tmp_path, run):
    with pytest.raises(UserError, match="no best.pt or last.pt"):
        shufflemamba.load_model(str(tmp_path))
    with pytest.raises(UserError, match="no EMA weights"):
        shufflemamba.load_model(run, ema=True)


def test_init_from_takes_the_architecture(run, folder, tmp_path):
    out = str(tmp_path / "ft")
    assert main(["train", "--data-dir", folder, "--epochs", "1", "--output", out, "--init-from",
                 os.path.join(run, "best.pt"), "--workers", "0"]) == 0
    old = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    new = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert new["model_kwargs"] == old["model_kwargs"] and new["img_size"] == old["img_size"]


# --------------------------------------------------------------------------- the small things


def test_epochs_zero_is_refused(folder, capsys, tmp_path):
    assert main(["train", "--data-dir", folder, "--epochs", "0", "--output", str(tmp_path / "z")]) == 2
    assert "epochs must be >= 1" in _err(capsys) and not os.path.exists(tmp_path / "z")


def test_yaml_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlr: [1e-3\nseed: 1\n")
    with pytest.raises(UserError, match=r"line \d+, column \d+"):
        load_config_file(str(bad))


def test_unknown_key_gets_did_you_mean(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("epoch: 3\n")
    with pytest.raises(UserError, match=r"epoch \(did you mean epochs\?\)"):
        load_config_file(str(cfg))


def test_unreadable_val_images_are_counted(tmp_path):
    root = make_folder(tmp_path / "d", n=8, size=16, split=True)
    open(os.path.join(root, "val", "red", "broken.png"), "wb").write(b"not an image")
    out = str(tmp_path / "r")
    assert main(["train", "--data-dir", root, "--epochs", "1", "--output", out, "--batch-size", "2", *TINY]) == 0
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["skipped_val_images"] == 1


def test_final_line_names_val_and_best(run, capsys):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    from shufflemamba.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.output = {"holdout": None, "save_best": True}, run
    trainer.progress = type("P", (), {"history": [dict(rows[0], val_top1=90.0), dict(rows[1], val_top1=50.0)]})()
    line = trainer._final_line()
    assert line.startswith("final val top-1 50.00% at epoch 1, best 90.00% at epoch 0 (best.pt)") and "test top" not in line


def test_eval_says_what_it_evaluated(run, folder, capsys):
    assert main(["eval", "--checkpoint", os.path.join(run, "best.pt"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"evaluated {os.path.join(run, 'best.pt')} (vim_tiny_patch16_224, epoch" in out
    assert f"7 held-out images of {folder}" in out


def test_doctor_is_readable():
    proc = subprocess.run([sys.executable, "-m", "shufflemamba", "doctor"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.lstrip().startswith("{") and "torch" in proc.stdout
