"""``amp: null`` (the default) means bf16 autocast on a CUDA device that supports it, off on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.cli import main
from shufflemamba.errors import UserError
from shufflemamba.training.config import DEFAULTS, resolve_amp, resolve_config

from test_train import make_folder, train_args


def test_default_is_auto():
    assert DEFAULTS["amp"] is None and resolve_config(None, {})["amp"] is None


def test_explicit_settings_stand():
    assert resolve_amp(True, "cpu") is True
    assert resolve_amp(False, "cuda") is False
    assert resolve_amp(None, "cpu") is False


@pytest.mark.parametrize("bf16,dtype,expected", [(True, "bfloat16", True), (False, "bfloat16", False),
                                                  (False, "float16", True)])
def test_auto_on_cuda_follows_the_device(monkeypatch, bf16, dtype, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_amp(None, torch.device("cuda", 0), dtype) is expected


def test_bad_value_is_a_user_error():
    with pytest.raises(UserError, match="amp must be true, false or null"):
        resolve_config(None, {"amp": "sometimes"})


@pytest.mark.slow
def test_cpu_run_records_the_resolved_setting(tmp_path):
    data = make_folder(str(tmp_path / "data"), n_train=8, n_val=4, classes=2)
    out = str(tmp_path / "run")
    assert main(train_args(data, out, 1)) == 0
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["amp"] is False
