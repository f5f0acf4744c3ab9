"""Tests of the pretrained configs and ``pretrained=True`` loading (shufflemamba.models.pretrained).

Nothing here touches the network: the released files are stood in for by small checkpoints laid out as
the released ones are (a training checkpoint: ``model``, ``model_ema``, optimizer and scheduler state,
``epoch``, ``scaler`` and the pickled ``argparse.Namespace`` of the training arguments).
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
from pathlib import Path

import huggingface_hub
import pytest
import shufflemamba  # noqa: F401  (registers the models in timm)
import timm
import torch
from huggingface_hub import constants as hf_constants
from shufflemamba.models import resize_pos_embed
from shufflemamba.models.pretrained import RELEASED_WEIGHTS, released

TINY = dict(patch_size=16, embed_dim=16, depth=2, d_state=4)
REG = dict(TINY, num_registers=2, cls_reduce=2)
README = Path(__file__).resolve().parents[1] / "docs" / "models.md"  # the released-weights table


def _model(name: str, img_size: int = 32, **kw):
    base = REG if name.startswith("mambar") else TINY
    return timm.create_model(name, img_size=img_size, **{**base, **kw})


def _released_layout(path: Path, model, ema) -> Path:
    """Save ``model`` as the authors' main.py saves its checkpoints (the released files are these)."""
    opt = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": {"last_epoch": 299},
                "epoch": 299, "model_ema": ema.state_dict(), "scaler": "none",
                "args": argparse.Namespace(model="vim_tiny", lr=5e-4, batch_size=128, finetune="")}, path)
    return path


def _same_backbone(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k.startswith(("head.", "pos_embed", "cls_token", "neck.", "norm_neck.")):
            continue
        assert torch.equal(v, sb[k]), k


# -- the configs -----------------------------------------------------------------------------------

def test_every_released_weight_is_a_timm_pretrained_tag_with_hub_id_file_and_top1():
    tags = set(timm.list_pretrained("vim*") + timm.list_pretrained("mambar*"))
    assert tags == {f"{w.model}.{w.tag}" for w in RELEASED_WEIGHTS}
    for w in RELEASED_WEIGHTS:
        with torch.device("meta"):
            model = timm.create_model(f"{w.model}.{w.tag}")
        cfg = model.pretrained_cfg
        assert (cfg["hf_hub_id"], cfg["hf_hub_filename"], cfg["tag"]) == (w.hf_hub_id, w.hf_hub_filename, w.tag)
        assert f"top-1 {w.top1}" in cfg["description"] and f"top1={w.top1}" in cfg["notes"]
        assert cfg["num_classes"] == 1000 and cfg["crop_pct"] == w.crop_pct and cfg["custom_load"]
        assert released(w.model) == w == released(f"{w.model}.{w.tag}")
        # the Vim files carry their accuracy in their name (vim_t_midclstok_76p1acc.pth)
        if w.model.startswith("vim"):
            assert f"{w.top1}".replace(".", "p") + "acc" in w.hf_hub_filename


@pytest.mark.parametrize("name, dim, tokens", [("vim_tiny_patch16_stride8_224", 192, 730),
                                               ("vim_small_patch16_stride8_224", 384, 730),
                                               ("vim_tiny_patch16_224", 192, 197)])
def test_stride8_names_build_vims_plus_architecture(name, dim, tokens):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.patch_embed.stride == ((8, 8) if "stride8" in name else (16, 16))
    assert model.pos_embed.shape == (1, tokens, dim)  # (224 - 16) / 8 + 1 = 27; 27 * 27 + 1 = 730


def test_models_without_released_weights():
    assert released("shufflemamba_base_patch16_224") is None and released("mambar_tiny_patch16_224") is None
    with pytest.raises(ValueError, match="no downloadable weights for shufflemamba_base_patch16_224.*"
                                         "pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("shufflemamba_base_patch16_224", pretrained=True)


def test_licences_only_where_the_source_repository_states_one():
    """hustvl/Vim: Apache-2.0; wangf3014/Mamba-Reg and huangzizheng01/ShuffleMamba state none (unknown)."""
    from shufflemamba.models import MODEL_NAMES

    for name in MODEL_NAMES + ("vim_tiny_patch16_stride8_224",):
        with torch.device("meta"):
            cfg = timm.create_model(name).pretrained_cfg
        assert cfg.get("license") == ("apache-2.0" if name.startswith("vim") else None), name


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "mambar_small_patch16_224"])
def test_fixed_input_size_is_what_the_model_does(name):
    """As timm's ViT: a model as registered rejects other sizes (fixed), one built with dynamic_img_size
    takes them (not fixed), and timm's input config and data config say so."""
    from timm.models import get_model_input_config

    fixed = _model(name).eval()
    assert get_model_input_config(fixed)["fixed_input_size"] is True
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        fixed(torch.randn(1, 3, 48, 48))
    dynamic = _model(name, dynamic_img_size=True).eval()
    assert get_model_input_config(dynamic)["fixed_input_size"] is False
    assert dynamic(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    data = timm.data.resolve_input_data_config(dynamic, args={"input_size": (3, 48, 48)})  # what timm's scripts use
    assert data["input_size"] == (3, 48, 48)
    with pytest.raises(ValueError, match="requires"):
        timm.data.resolve_input_data_config(fixed, args={"input_size": (3, 48, 48)})


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "shufflemamba_base_patch16_224", "mambar_small_patch16_224"])
def test_global_pool_avg_is_the_mean_of_the_patch_tokens(name):
    """timm's validate.py --gp avg: the constructors take global_pool ('token' or 'avg'), as ViT's do."""
    model = _model(name, num_classes=5, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, M + prefix, D)
        prefix = model._prefix_positions(4)  # 2 x 2 patches at 32 px
        keep = [i for i in range(tokens.shape[1]) if i not in prefix]
        assert len(keep) == 4
        torch.testing.assert_close(model(x), model.head(tokens[:, keep].mean(1)))
    assert model.num_features == model.embed_dim and not hasattr(model, "neck")
    assert model.model_kwargs["global_pool"] == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        _model(name, global_pool="max")


def test_reset_classifier_switches_to_avg_pooling():
    model = _model("mambar_small_patch16_224").eval()  # registers reduced by the neck
    assert model.num_features == 2 * 16 // 2 and hasattr(model, "neck")
    model.reset_classifier(4, global_pool="avg")
    assert model.num_features == 16 and not hasattr(model, "neck") and model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="register neck"):
        model.reset_classifier(4, global_pool="token")


def test_torchscript_is_refused_in_one_line():
    """timm's --torchscript runs torch.jit.script(model): one line that says why, not a deep traceback."""
    for name in ("vim_tiny_patch16_224", "mambar_small_patch16_224"):
        with pytest.raises(RuntimeError, match=r"^Vision\w+ does not support TorchScript .*eager mode$"):
            torch.jit.script(_model(name).eval())


def test_readme_lists_the_registered_weights_and_their_reported_top1():
    text = README.read_text()
    for w in RELEASED_WEIGHTS:
        row = next((line for line in text.splitlines() if f"`{w.model}.{w.tag}`" in line), None)
        assert row is not None, f"README has no row for {w.model}.{w.tag}"
        assert re.search(rf"\b{w.top1}\b", row), row


# -- pretrained=True from a local file (the released layout) ----------------------------------------

@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224", "mambar_small_patch16_224",
                                  "shufflemamba_base_patch16_224"])
def test_pretrained_from_released_layout_loads_model_not_ema(tmp_path, name, caplog):
    src = _model(name, num_classes=1000)
    path = _released_layout(tmp_path / "released.pth", src, ema=_model(name, num_classes=1000))
    with caplog.at_level(logging.INFO, logger="shufflemamba"):
        model = timm.create_model(name, pretrained=True, img_size=32, **(REG if "mambar" in name else TINY),
                                  pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in src.state_dict().items():  # every entry, head included (same class count)
        assert torch.equal(model.state_dict()[k], v), k
    assert not [r for r in caplog.records if "fine-tuning" in r.getMessage()]  # nothing dropped, nothing said


def test_pretrained_resizes_pos_embed_for_another_resolution(tmp_path):
    src = _model("vim_tiny_patch16_stride8_224", img_size=48)  # grid 5 x 5
    path = _released_layout(tmp_path / "plus.pth", src, ema=src)
    model = timm.create_model("vim_tiny_patch16_stride8_224", pretrained=True, img_size=64, **TINY,
                              pretrained_cfg_overlay=dict(file=str(path)))  # grid 7 x 7
    assert model.pos_embed.shape == (1, 50, 16)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(src.pos_embed, 7, cls_position="middle"))
    _same_backbone(src, model)


def test_pretrained_with_another_class_count_drops_the_head_in_one_line(tmp_path, caplog):
    src = _model("vim_tiny_patch16_224", num_classes=1000)
    path = _released_layout(tmp_path / "vim.pth", src, ema=src)
    with caplog.at_level(logging.INFO, logger="shufflemamba"):
        model = timm.create_model("vim_tiny_patch16_224", pretrained=True, img_size=32, num_classes=5, **TINY,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    lines = [r.getMessage() for r in caplog.records if "fine-tuning" in r.getMessage()]
    assert len(lines) == 1
    assert "head.weight 1000x16 -> 5x16" in lines[0] and "head.bias 1000 -> 5" in lines[0]
    assert "cls_token" not in lines[0]  # same shape: loaded
    assert model.head.weight.shape == (5, 16)
    _same_backbone(src, model)
    assert torch.equal(model.cls_token, src.cls_token) and torch.equal(model.pos_embed, src.pos_embed)


def test_pretrained_with_another_register_layout_drops_registers_and_neck(tmp_path, caplog):
    src = _model("mambar_small_patch16_224", num_classes=1000)  # 2 registers, neck 16 -> 8
    path = _released_layout(tmp_path / "reg.pth", src, ema=src)
    with caplog.at_level(logging.INFO, logger="shufflemamba"):
        model = timm.create_model("mambar_small_patch16_224", pretrained=True, img_size=32,
                                  **{**REG, "num_registers": 3, "cls_reduce": 4},
                                  pretrained_cfg_overlay=dict(file=str(path)))
    (line,) = [r.getMessage() for r in caplog.records if "fine-tuning" in r.getMessage()]
    for key in ("cls_token 1x2x16 -> 1x3x16", "pos_embed_cls 1x2x16 -> 1x3x16", "neck.weight 8x16 -> 4x16",
                "norm_neck.weight 16 -> 12", "head.weight 1000x16 -> 1000x12"):
        assert key in line, (key, line)
    assert "head.bias" not in line  # 1000 classes both: kept
    _same_backbone(src, model)
    assert torch.equal(model.pos_embed, src.pos_embed) and torch.equal(model.head.bias, src.head.bias)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_pretrained_rejects_another_backbone(tmp_path):
    path = _released_layout(tmp_path / "vim.pth", _model("vim_tiny_patch16_224"), ema=_model("vim_tiny_patch16_224"))
    with pytest.raises(ValueError, match="A_log"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True, img_size=32, **{**TINY, "d_state": 8},
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_file_with_other_pickles_names_the_opt_in(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": _model("vim_tiny_patch16_224").state_dict(), "extra": _Opaque()}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True, img_size=32, **TINY,
                          pretrained_cfg_overlay=dict(file=str(path)))


class _Opaque:
    pass


def test_grey_input_adapts_the_patch_projection(tmp_path):
    src = _model("vim_tiny_patch16_224")
    path = _released_layout(tmp_path / "vim.pth", src, ema=src)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, img_size=32, in_chans=1, **TINY,
                              pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))


# -- the Hub path, without the network ------------------------------------------------------------------

def test_hub_id_and_filename_reach_the_download(tmp_path, monkeypatch):
    src = _model("vim_tiny_patch16_224")
    path = _released_layout(tmp_path / "vim_t_midclstok_76p1acc.pth", src, ema=_model("vim_tiny_patch16_224"))
    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename, kw.get("local_files_only", False)))
        return str(path)  # as if it were in the Hub cache

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = timm.create_model("vim_tiny_patch16_224.in1k", pretrained=True, img_size=32, **TINY)
    assert asked == [("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", True)]
    assert torch.equal(model.layers[1].mixer.A_log, src.layers[1].mixer.A_log)
    assert model.pretrained_cfg["file"] == str(path)


def _not_cached(**kw):
    raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")


def test_no_file_and_offline_mode_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(RuntimeError, match=r"could not fetch the weights of vim_small_patch16_224\.in1k .*"
                                           r"hustvl/Vim-small-midclstok/vim_s_midclstok_80p5acc\.pth.*"
                                           r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("vim_small_patch16_224", pretrained=True)


def test_no_network_fails_at_once_instead_of_retrying(monkeypatch):
    calls = []

    def download(**kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            _not_cached()
        raise AssertionError("must not try the network when the Hub's name does not resolve")

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(RuntimeError, match="mambar_base_patch16_224.in1k.*cannot resolve huggingface.co"):
        timm.create_model("mambar_base_patch16_224", pretrained=True)
    assert len(calls) == 1 and calls[0]["local_files_only"]


def test_plus_fine_tune_starts_from_the_stride16_weights(tmp_path, caplog):
    """Vim's "+" recipe: the stride-8 model fine-tuned from the stride-16 checkpoint (pos_embed resized)."""
    src = _model("vim_tiny_patch16_224", img_size=64, num_classes=1000)  # grid 4 x 4
    path = _released_layout(tmp_path / "vim_t_midclstok_76p1acc.pth", src, ema=src)
    with caplog.at_level(logging.INFO, logger="shufflemamba"):
        plus = timm.create_model("vim_tiny_patch16_stride8_224", pretrained=True, img_size=64, **TINY,
                                 pretrained_cfg_overlay=dict(file=str(path)))  # grid 7 x 7
    assert plus.pos_embed.shape == (1, 50, 16) and plus.cls_index == 24
    torch.testing.assert_close(plus.pos_embed, resize_pos_embed(src.pos_embed, 7, cls_position="middle"))
    assert torch.equal(plus.pos_embed[0, 24], src.pos_embed[0, 8])  # the class-token row, moved to the middle
    _same_backbone(src, plus)
    assert not [r for r in caplog.records if "fine-tuning" in r.getMessage()]
