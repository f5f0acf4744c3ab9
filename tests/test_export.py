"""``shufflemamba export``: a run becomes a folder that timm alone loads back into the same model.

Every run and checkpoint here is made by the test (no downloads; the Hub is never reached: pushing is
tested offline and against a stand-in for huggingface_hub's HfApi).
"""

from __future__ import annotations

import json
import os
import shutil

import huggingface_hub
import pytest
import shufflemamba  # noqa: F401  (registers the models in timm)
import timm
import torch
from huggingface_hub import constants as hf_constants
from shufflemamba.cli import main

TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, d_state=4, num_classes=3)
FAMILIES = {  # one registered name per family, shrunk
    "vim_tiny_patch16_224": TINY,
    "shufflemamba_middle_patch16_224": TINY,  # LayerNorm, class token at the head, SLWS 0.5
    "mambar_small_patch16_224": dict(TINY, num_registers=2, cls_reduce=2),
}
CLASSES = ["ant", "bee", "cat"]


def _one_error_line(code: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _images(seed: int = 0, n: int = 4, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, 16, 16, generator=torch.Generator().manual_seed(seed))


def _checkpoint(path, name: str, with_ema: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A training checkpoint as `shufflemamba train` lays it out, with EMA weights unlike the model's."""
    torch.manual_seed(0)
    kwargs = FAMILIES[name]
    model, ema = timm.create_model(name, **kwargs), timm.create_model(name, **kwargs)
    history = [{"epoch": 0, "train_loss": 1.2, "val_loss": 1.1, "val_top1": 41.25, "val_top5": 100.0, "ema_top1": 40.0},
               {"epoch": 1, "train_loss": 1.0, "val_loss": 1.05, "val_top1": 38.75, "val_top5": 100.0, "ema_top1": 42.5}]
    torch.save({"version": 2, "model_name": name, "model_kwargs": kwargs, "model": model.state_dict(),
                "model_ema": ema.state_dict() if with_ema else None, "classes": CLASSES,
                "config": {"model": name, "epochs": 2, "img_size": 16, "mean": [0.5], "std": [0.25], "crop_pct": 0.9,
                           "interpolation": "bilinear", "data_dir": "/data/bugs", "lr": 1e-3, "model_ema": with_ema},
                "progress": {"epoch": 2, "batches_done": 0, "history": history}, "metrics": history[-1]}, path)
    return model.eval(), ema.eval()


def _load(folder) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@pytest.mark.parametrize("use_ema", [False, True], ids=["model", "ema"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_back_through_timm_with_identical_logits(tmp_path, capsys, name, use_ema):
    model, ema = _checkpoint(tmp_path / "last.pt", name)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "last.pt"), str(out), *(["--ema"] if use_ema else [])]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "curves.png", "model.safetensors"]
    loaded = _load(out)
    want, other = (ema, model) if use_ema else (model, ema)
    x = _images()
    with torch.no_grad():
        got = loaded(x)
        assert torch.equal(got, want(x))
        assert not torch.allclose(got, other(x))  # the other set of weights really differs
    assert type(loaded) is type(model) and loaded.pretrained_cfg["label_names"] == CLASSES


def test_config_json_has_the_architecture_labels_and_preprocessing_of_the_run(tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 0  # a run folder: its last.pt
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "vim_tiny_patch16_224" and cfg["num_classes"] == 3 and cfg["label_names"] == CLASSES
    assert cfg["model_args"]["embed_dim"] == 16 and cfg["model_args"]["slws_rate"] == 0.0
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 16, 16] and pre["crop_pct"] == 0.9 and pre["interpolation"] == "bilinear"
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3 and pre["fixed_input_size"] is True
    # nothing of the released Vim-Ti weights the registered config describes: not their Hub file, accuracy or licence
    assert not {"hf_hub_id", "hf_hub_filename", "notes", "license", "tag"} & set(pre)
    assert "top-1 38.75%" in pre["description"]
    # the model built from the folder says the same as the folder
    data = timm.data.resolve_model_data_config(_load(tmp_path / "out"))
    assert tuple(data["input_size"]) == (3, 16, 16) and tuple(data["mean"]) == (0.5,) * 3 and data["crop_pct"] == 0.9


def test_a_dynamic_size_model_exports_as_not_fixed_and_takes_other_sizes(tmp_path, capsys):
    kwargs = dict(TINY, dynamic_img_size=True)
    model = timm.create_model("vim_tiny_patch16_224", **kwargs).eval()
    torch.save({"model_name": "vim_tiny_patch16_224", "model_kwargs": kwargs, "model": model.state_dict(),
                "classes": CLASSES, "config": {"img_size": 16}}, tmp_path / "last.pt")
    assert main(["export", str(tmp_path / "last.pt"), str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["fixed_input_size"] is False and cfg["model_args"]["dynamic_img_size"] is True
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(_load(tmp_path / "out")(x), model(x))
    assert "The checkpoint records no evaluated epoch." in (tmp_path / "out" / "README.md").read_text()


def test_model_card_lists_the_runs_metrics_recipe_and_slws(tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt", "shufflemamba_middle_patch16_224")
    assert main(["export", str(tmp_path / "last.pt"), str(tmp_path / "out"), "--license", "mit"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card and "library_name: timm" in card
    assert "| top-1 (%) | 38.75 | 41.25 |" in card  # final epoch, best epoch
    assert "| EMA top-1 (%) | 42.50 | 40.00 |" in card
    assert "final (epoch 2)" in card and "best top-1 (epoch 1)" in card
    assert "p_max 0.5, linear" in card  # the family's SLWS default, as the model was built
    assert "image folder 'bugs'" in card and "/data" not in card  # the data's name, not the local path
    assert "| lr | 0.001 |" in card and "![loss and top-1 per epoch](curves.png)" in card
    assert f'timm.create_model("local-dir:{tmp_path / "out"}", pretrained=True)' in card
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_cfg"]["license"] == "mit"


def test_without_a_licence_the_card_and_config_state_none(tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    assert main(["export", str(tmp_path / "last.pt"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license:" not in card and "No licence was given" in card


def _eval_json(argv, capsys) -> dict:
    assert main(["eval", *argv, "--json", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_demo_run_exports_loads_back_and_evaluates_the_same(tmp_path, capsys, make_fashion_idx):
    """End to end on the README's demo recipe (a stand-in Fashion-MNIST): `train` -> `export --ema` ->
    timm alone gives the EMA model's logits, and `eval` of the folder gives the run's own numbers."""
    data = make_fashion_idx(tmp_path, 64, 32, 10)
    run = tmp_path / "run"
    assert main(["train", "--config", "demo", "--data-dir", data, "--train-subset", "64", "--epochs", "2",
                 "--batch-size", "16", "--model-ema", "--output", str(run)]) == 0
    assert main(["export", str(run), str(tmp_path / "out"), "--ema"]) == 0  # a run folder: its best.pt
    ckpt = torch.load(run / "best.pt", weights_only=True)
    model = timm.create_model("vim_tiny_patch16_224", **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["model_ema"])
    loaded = _load(tmp_path / "out")
    x = _images(chans=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["label_names"] == ckpt["classes"] and len(ckpt["classes"]) == 10
    assert tuple(loaded.pretrained_cfg["input_size"]) == (1, 16, 16)
    assert (tmp_path / "out" / "curves.png").read_bytes() == (run / "curves.png").read_bytes()
    card = (tmp_path / "out" / "README.md").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = rows[ckpt["epoch"]]  # the epoch these weights are from
    assert f"| top-1 (%) | {final['val_top1']:.2f} |" in card and f"{final['ema_top1']:.2f}" in card
    assert "p_max 0.1, linear" in card and "from `best.pt`, EMA" in card and "fashion-mnist" in card

    capsys.readouterr()
    data_flags = ["--dataset", "fashion-mnist", "--data-dir", data]
    from_run = _eval_json(["--checkpoint", str(run / "best.pt"), "--ema", *data_flags], capsys)
    for source in (str(tmp_path / "out"), f"local-dir:{tmp_path / 'out'}"):
        from_export = _eval_json(["--checkpoint", source, *data_flags], capsys)
        assert from_export["images"] == from_run["images"] == 32
        assert from_export["top1"] == from_run["top1"] and from_export["loss"] == pytest.approx(from_run["loss"], rel=1e-6)


def test_eval_of_a_corrupted_or_foreign_folder_is_one_line(tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    assert main(["export", str(tmp_path / "last.pt"), str(tmp_path / "good")]) == 0
    capsys.readouterr()
    flags = ["--data-dir", str(tmp_path)]
    broken = {
        "bad_json": lambda d: (d / "config.json").write_text("{not json"),
        "foreign_arch": lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"vim_tiny_patch16_224"', '"no_such_net"')),
        "cut_weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
        "no_weights": lambda d: (d / "model.safetensors").unlink(),
    }
    for name, spoil in broken.items():
        shutil.copytree(tmp_path / "good", tmp_path / name)
        spoil(tmp_path / name)
        _one_error_line(main(["eval", "--checkpoint", str(tmp_path / name), *flags]), capsys, "could not load", name)
    _one_error_line(main(["eval", "--checkpoint", f"local-dir:{tmp_path / 'nothing'}", *flags]), capsys, "not a folder")
    _one_error_line(main(["eval", "--checkpoint", str(tmp_path / "good"), "--ema", *flags]), capsys, "drop --ema")
    _one_error_line(main(["eval", "--checkpoint", str(tmp_path / "good")]), capsys, "--data-dir")


# -- bad input: one line, nothing written ----------------------------------------------------------------


def _assert_nothing_written(parent, *keep: str) -> None:
    assert sorted(os.listdir(parent)) == sorted(keep), os.listdir(parent)  # no output, no temp folder


def test_missing_foreign_and_corrupted_sources_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert _one_error_line(main(["export", str(tmp_path / "nope"), str(out)]), capsys, "not found")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    _one_error_line(main(["export", str(tmp_path / "junk.pt"), str(out)]), capsys, "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    _one_error_line(main(["export", str(tmp_path / "foreign.pt"), str(out)]), capsys, "no model state dict")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "unnamed.pt")
    _one_error_line(main(["export", str(tmp_path / "unnamed.pt"), str(out)]), capsys, "does not name its model")
    _checkpoint(tmp_path / "good.pt", "vim_tiny_patch16_224")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    _one_error_line(main(["export", str(tmp_path / "cut.pt"), str(out)]), capsys, "could not be read")
    ckpt = torch.load(tmp_path / "good.pt", weights_only=True)
    ckpt["model_kwargs"] = {**ckpt["model_kwargs"], "depth": 3}
    torch.save(ckpt, tmp_path / "mismatch.pt")
    _one_error_line(main(["export", str(tmp_path / "mismatch.pt"), str(out)]), capsys, "does not rebuild")
    os.makedirs(tmp_path / "empty_run")
    _one_error_line(main(["export", str(tmp_path / "empty_run"), str(out)]), capsys, "no best.pt or last.pt")
    _assert_nothing_written(tmp_path, "junk.pt", "foreign.pt", "unnamed.pt", "good.pt", "cut.pt", "mismatch.pt", "empty_run")


def test_ema_without_ema_weights_is_one_line(tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224", with_ema=False)
    _one_error_line(main(["export", str(tmp_path / "last.pt"), str(tmp_path / "out"), "--ema"]), capsys, "no EMA weights")
    _assert_nothing_written(tmp_path, "last.pt")


def test_an_existing_folder_is_refused_unless_overwrite_replaces_an_earlier_export(tmp_path, capsys):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):  # not empty; with --overwrite: not an earlier export
        _one_error_line(main(["export", str(tmp_path / "last.pt"), str(other), *extra]), capsys, str(other))
    assert os.listdir(other) == ["mine.txt"]
    _one_error_line(main(["export", str(tmp_path / "last.pt"), str(tmp_path)]), capsys, "holds the checkpoint")

    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "last.pt"), str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    _one_error_line(main(["export", str(tmp_path / "last.pt"), str(out), "--ema"]), capsys, "--overwrite")
    assert (out / "model.safetensors").read_bytes() == first
    assert main(["export", str(tmp_path / "last.pt"), str(out), "--ema", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first  # now the EMA weights
    _assert_nothing_written(tmp_path, "last.pt", "notes", "out")


# -- the Hub --------------------------------------------------------------------------------------------


def test_push_offline_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["export", str(tmp_path / "last.pt"), str(tmp_path / "out"), "--push-to-hub", "someone/tiny-vim"])
    _one_error_line(code, capsys, "cannot publish to the Hugging Face Hub", "--push-to-hub")
    _assert_nothing_written(tmp_path, "last.pt")


class _FakeHub:
    """Stands in for huggingface_hub.HfApi: a logged-in user, uploads recorded (files copied away)."""

    uploads: list = []

    def whoami(self):
        return {"name": "someone"}

    def create_repo(self, repo_id, exist_ok=False):
        assert exist_ok
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.uploads.append((repo_id, {f: open(os.path.join(folder_path, f), "rb").read() for f in os.listdir(folder_path)}))


def test_push_uploads_the_same_folder_in_one_commit(tmp_path, capsys, monkeypatch):
    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    _FakeHub.uploads = []
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "last.pt"), str(out), "--push-to-hub", "someone/tiny-vim"]) == 0
    assert len(_FakeHub.uploads) == 1
    repo, files = _FakeHub.uploads[0]
    assert repo == "someone/tiny-vim" and files == {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert b'timm.create_model("hf-hub:someone/tiny-vim", pretrained=True)' in files["README.md"]


def test_hf_hub_name_loads_a_pushed_folder_from_the_cache(tmp_path, capsys, monkeypatch):
    """What a user gets from `hf-hub:USER/NAME` once pushed (the Hub cache laid out as huggingface_hub does)."""
    model, _ = _checkpoint(tmp_path / "last.pt", "mambar_small_patch16_224")
    assert main(["export", str(tmp_path / "last.pt"), str(tmp_path / "out")]) == 0
    revision = "0" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-reg"
    shutil.copytree(tmp_path / "out", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = timm.create_model("hf-hub:someone/tiny-reg", pretrained=True, cache_dir=str(tmp_path / "cache")).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_failed_upload_keeps_the_finished_folder_and_says_how_to_retry(tmp_path, capsys, monkeypatch):
    class _Down(_FakeHub):
        def upload_folder(self, **kw):
            raise ConnectionError("connection reset")

    _checkpoint(tmp_path / "last.pt", "vim_tiny_patch16_224")
    monkeypatch.setattr(huggingface_hub, "HfApi", _Down)
    out = tmp_path / "out"
    code = main(["export", str(tmp_path / "last.pt"), str(out), "--push-to-hub", "someone/tiny-vim"])
    _one_error_line(code, capsys, f"exported to '{out}'", "connection reset", f"hf upload someone/tiny-vim {out}")
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "curves.png", "model.safetensors"]
    _one_error_line(main(["export", str(tmp_path / "last.pt"), str(tmp_path / "o2"), "--push-to-hub", "a/b/c"]),
                    capsys, "USER/NAME")
