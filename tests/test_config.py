"""Config resolution: presets, YAML files, flag overrides, validation."""

from __future__ import annotations

import pytest
import yaml

import shufflemamba  # noqa: F401
from shufflemamba.errors import UserError
from shufflemamba.training.config import DEFAULTS, list_presets, load_config_file, parse_kv_list, resolve_config


def test_shipped_presets_all_resolve():
    names = list_presets()
    for name in ("shufflemamba_base_in1k", "vim_small_in1k", "reg_base_stage1", "reg_base_stage2", "reg_base_stage3", "demo"):
        assert name in names
        cfg = resolve_config(name, {})
        assert set(cfg) == set(DEFAULTS)


def test_shufflemamba_base_recipe_matches_spec():
    cfg = resolve_config("shufflemamba_base_in1k", {})
    assert cfg["opt_betas"] == [0.9, 0.95] and cfg["weight_decay"] == 0.1
    assert cfg["slws_rate"] == 0.5 and cfg["drop_path"] == 0.5 and cfg["clip_grad"] == 3.0
    assert cfg["warmup_epochs"] == 30 and cfg["min_lr"] == 5e-6 and cfg["model_ema_decay"] == 0.9999
    assert resolve_config("reg_base_stage1", {})["img_size"] == 128
    assert resolve_config("reg_base_stage3", {})["lr"] == 1e-5


def test_flags_override_preset_and_merge_model_kwargs():
    base = resolve_config("demo", {})
    cfg = resolve_config("demo", {"epochs": 2, "lr": 3e-4, "model_kwargs": {"depth": 2}, "seed": None})
    assert cfg["epochs"] == 2 and cfg["lr"] == 3e-4
    assert cfg["seed"] == base["seed"]  # None means "not given"
    assert cfg["model_kwargs"]["depth"] == 2
    assert cfg["model_kwargs"]["in_chans"] == base["model_kwargs"]["in_chans"] == 1  # preset's other kwargs kept


def test_config_file_by_path(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text(yaml.safe_dump({"epochs": 7, "dataset": "FMNIST"}))
    cfg = resolve_config(str(p), {"batch_size": 4})
    assert cfg["epochs"] == 7 and cfg["batch_size"] == 4 and cfg["dataset"] == "fashion-mnist"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"epochs": -1}, "epochs must be >= 1"),
        ({"slws_rate": 1.5}, r"slws_rate must be in \[0.0, 1.0\]"),
        ({"slws_rate": -0.1}, "slws_rate"),
        ({"drop_path": 2.0}, "drop_path"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be in"),
        ({"slws_schedule": "cubic"}, "slws_schedule"),
        ({"dataset": "cifar"}, "unknown dataset"),
        ({"opt_betas": [0.9, 1.5]}, "opt_betas"),
    ],
)
def test_bad_values_are_user_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        resolve_config(None, overrides)


def test_unknown_preset_and_keys(tmp_path):
    with pytest.raises(UserError, match="unknown preset.*demo"):
        load_config_file("no_such_preset")
    p = tmp_path / "bad.yaml"
    p.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown option.*learning_rate"):
        load_config_file(str(p))
    p.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config_file(str(p))


def test_parse_model_kwargs():
    assert parse_kv_list(["depth=4", "cls_position=head", "rate=0.5", "flag=true", "dims=[1, 2]"]) == {
        "depth": 4, "cls_position": "head", "rate": 0.5, "flag": True, "dims": [1, 2]}
    for bad in (["depth"], ["=3"], ["a b=3"]):
        with pytest.raises(UserError, match="malformed --model-kwargs"):
            parse_kv_list(bad)


def test_wd_grouping_validated_and_old_configs_keep_the_mamba_rule():
    assert DEFAULTS["wd_grouping"] == "reference"
    assert resolve_config(None, {})["wd_grouping"] == "reference"
    assert resolve_config("demo", {})["wd_grouping"] == "mamba"  # pinned: the rule it was measured with
    assert resolve_config("demo", {"wd_grouping": "reference"})["wd_grouping"] == "reference"
    with pytest.raises(UserError, match="wd_grouping must be 'reference' or 'mamba'"):
        resolve_config(None, {"wd_grouping": "ours"})
    from shufflemamba.training.config import validate_config

    saved = resolve_config(None, {})
    del saved["wd_grouping"]  # a checkpoint's config from before the key: trained with the Mamba rule
    assert validate_config(saved)["wd_grouping"] == "mamba"


def _print_config(argv, capsys, monkeypatch):
    import shufflemamba.training.trainer as train_mod
    from shufflemamba.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("--print-config must not train or build data")

    monkeypatch.setattr(train_mod, "train", no_training)
    rc = main(["train", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_print_config_shows_the_resolved_recipe_and_exits(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc, out, err = _print_config(["--config", "shufflemamba_base_in1k", "--epochs", "3", "--print-config", "8"], capsys, monkeypatch)
    assert rc == 0 and err == ""
    assert yaml.safe_load(out) == resolve_config("shufflemamba_base_in1k", {"epochs": 3})  # flags applied
    assert out.splitlines()[-1].startswith("# effective at 8 processes x batch 256: total batch 2048, lr 0.002 ")
    # without a count: torchrun's WORLD_SIZE, else one process
    rc, out, _ = _print_config(["--config", "vim_small_in1k", "--print-config"], capsys, monkeypatch)
    assert rc == 0 and "# effective at 1 process x batch 64: total batch 64, lr 0.000125 " in out
    monkeypatch.setenv("WORLD_SIZE", "8")
    rc, out, _ = _print_config(["--config", "vim_small_in1k", "--print-config"], capsys, monkeypatch)
    assert rc == 0 and "total batch 512, lr 0.001 " in out
    rc, out, _ = _print_config(["--config", "demo", "--print-config", "2"], capsys, monkeypatch)
    assert rc == 0 and "total batch 256, lr 0.004 (scale_lr false" in out  # absolute lr


@pytest.mark.parametrize(
    "argv, env, match",
    [
        (["--config", "no_such_preset", "--print-config"], None, "unknown preset"),
        (["--config", "demo", "--print-config", "0"], None, "positive integer"),
        (["--config", "demo", "--print-config"], "many", "WORLD_SIZE must be a positive integer"),
    ],
)
def test_print_config_errors_are_one_line(argv, env, match, capsys, monkeypatch):
    if env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", env)
    rc, out, err = _print_config(argv, capsys, monkeypatch)
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and match in err


def test_demo_recipe_is_the_one_its_header_measures():
    """configs/demo.yaml is our own recipe (no reference script): its header derives these values
    (issue 12 trials) and the README's demo table was measured with them."""
    cfg = resolve_config("demo", {})
    assert (cfg["img_size"], cfg["scale"], cfg["ratio"], cfg["hflip"]) == (16, [1.0, 1.0], [1.0, 1.0], 0.5)
    assert (cfg["lr"], cfg["scale_lr"], cfg["warmup_epochs"], cfg["epochs"], cfg["batch_size"]) == (4e-3, False, 0.5, 7, 128)
    assert cfg["model_kwargs"]["patch_size"] == 4 and cfg["slws_rate"] == 0.1
