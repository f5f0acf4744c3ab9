"""Config resolution: presets, YAML files, flag overrides, validation."""

from __future__ import annotations

import pytest
import yaml

import shufflemamba  # noqa: F401
from shufflemamba.config import DEFAULTS, UserError, list_presets, load_config_file, parse_kv_list, resolve_config


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
        ({"epochs": -1}, "epochs must be >= 0"),
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
