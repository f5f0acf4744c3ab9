"""Tests of checkpoint loading and position-embedding resizing (shufflemamba.models.checkpoint)."""

from __future__ import annotations

import argparse
import os

import pytest
import shufflemamba  # noqa: F401  (registers the models in timm)
import timm
import torch
import torch.nn.functional as F
from shufflemamba.models import load_checkpoint, prepare_state_dict, resize_pos_embed
from shufflemamba.models.checkpoint import init_from_checkpoint

TINY = dict(patch_size=16, embed_dim=16, depth=2, d_state=4, num_classes=3)


def _model(name="vim_tiny_patch16_224", img_size=32, **kw):
    return timm.create_model(name, img_size=img_size, **{**TINY, **kw})


def _marked_pos_embed(grid, cls_index, dim=4):
    """Patch rows hold a smooth ramp in [0, 1], the class-token row holds 100: easy to track."""
    m = grid * grid
    patches = torch.linspace(0, 1, m)[:, None].expand(m, dim)
    cls = torch.full((1, dim), 100.0)
    return torch.cat((patches[:cls_index], cls, patches[cls_index:]))[None]  # (1, M + 1, D)


# -- resize_pos_embed ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_position", ["middle", "head"])
def test_resize_to_same_grid_is_identity(cls_position):
    pe = torch.randn(1, 17, 8)
    assert torch.equal(resize_pos_embed(pe, (4, 4), cls_position=cls_position), pe)


@pytest.mark.parametrize("cls_position, old_index, new_index", [("middle", 8, 18), ("head", 0, 0)])
def test_resize_moves_class_token_to_its_new_index(cls_position, old_index, new_index):
    pe = _marked_pos_embed(4, old_index)
    out = resize_pos_embed(pe, (6, 6), old_grid=(4, 4), cls_position=cls_position)
    assert out.shape == (1, 37, 4)
    assert torch.equal(out[0, new_index], pe[0, old_index])
    patches = torch.cat((out[:, :new_index], out[:, new_index + 1 :]), dim=1)
    assert patches.abs().max() < 2  # the class token was not interpolated into the grid
    # the patch rows are the bicubic resize of the old patch grid
    old = torch.cat((pe[:, :old_index], pe[:, old_index + 1 :]), dim=1).reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
    ref = F.interpolate(old, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 4)
    torch.testing.assert_close(patches, ref)


def test_resize_round_trip_through_a_larger_grid_keeps_structure():
    pe = _marked_pos_embed(4, 8)
    back = resize_pos_embed(resize_pos_embed(pe, 8), 4)  # middle: index 8 -> 32 -> 8
    assert torch.equal(back[0, 8], pe[0, 8])
    torch.testing.assert_close(back, pe, atol=0.05, rtol=0)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="square grid"):
        resize_pos_embed(torch.zeros(1, 13, 4), 4)
    with pytest.raises(ValueError, match="does not match"):
        resize_pos_embed(torch.zeros(1, 17, 4), 4, old_grid=(3, 3))
    with pytest.raises(ValueError, match="cls_position"):
        resize_pos_embed(torch.zeros(1, 17, 4), 5, cls_position="tail")
    non_square = resize_pos_embed(torch.randn(1, 7, 4), (3, 3), old_grid=(2, 3))
    assert non_square.shape == (1, 10, 4)


# -- load_checkpoint -------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model_ema": sd},
    lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},  # saved from DDP
])
def test_load_checkpoint_accepts_common_layouts(wrap):
    src, dst = _model(), _model()
    load_checkpoint(dst, wrap(src.state_dict()))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_checkpoint_key_selects_ema_and_path_works(tmp_path):
    a, b, dst = _model(), _model(), _model()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": a.state_dict(), "model_ema": b.state_dict()}, path)
    load_checkpoint(dst, path, key="model_ema")
    assert torch.equal(dst.pos_embed, b.pos_embed)
    load_checkpoint(dst, str(path))
    assert torch.equal(dst.pos_embed, a.pos_embed)
    with pytest.raises(KeyError):
        load_checkpoint(dst, path, key="ema")


class _Opaque:
    """A pickled object that is not on torch's weights_only allowlist."""


def test_official_layout_loads_with_weights_only_and_other_pickles_need_opt_in(tmp_path):
    src, dst = _model(), _model()
    path = tmp_path / "official.pth"
    # the released files: weights under "model", beside EMA weights and the argparse arguments
    torch.save({"model": src.state_dict(), "model_ema": _model().state_dict(), "epoch": 299,
                "args": argparse.Namespace(lr=1e-3, model="vim")}, path)
    load_checkpoint(dst, path)  # weights_only=True: argparse.Namespace is allowed
    assert torch.equal(dst.cls_token, src.cls_token)  # "model", not "model_ema"
    other = tmp_path / "other.pth"
    torch.save({"model": src.state_dict(), "extra": _Opaque()}, other)
    with pytest.raises(ValueError, match="other than tensors and argparse.Namespace.*weights_only=False"):
        load_checkpoint(dst, other)
    load_checkpoint(dst, other, weights_only=False)
    assert torch.equal(dst.cls_token, src.cls_token)


@pytest.mark.parametrize("name, cls_position", [("vim_tiny_patch16_224", "middle"),
                                                ("shufflemamba_base_patch16_224", "head")])
def test_load_checkpoint_resizes_pos_embed_to_the_model_grid(name, cls_position):
    src, dst = _model(name, img_size=32), _model(name, img_size=64)  # grid 2x2 -> 4x4
    load_checkpoint(dst, {"model": src.state_dict()})
    assert dst.pos_embed.shape == (1, 17, 16)
    torch.testing.assert_close(dst.pos_embed, resize_pos_embed(src.pos_embed, 4, cls_position=cls_position))
    assert torch.equal(dst.pos_embed[0, dst.cls_index], src.pos_embed[0, src.cls_index])
    assert torch.isfinite(dst(torch.randn(1, 3, 64, 64))).all()


def test_architecture_mismatch_raises_clear_error():
    with pytest.raises(ValueError, match=r"architecture.*A_log: checkpoint \(32, 8\) vs model \(32, 4\)"):
        load_checkpoint(_model(embed_dim=16), _model(embed_dim=16, d_state=8).state_dict())
    with pytest.raises(ValueError, match="missing.*layers.2"):
        load_checkpoint(_model(depth=3), _model(depth=2).state_dict())
    with pytest.raises(ValueError, match="unexpected"):
        load_checkpoint(_model(depth=2), _model(depth=3).state_dict())
    with pytest.raises(ValueError, match="embed_dim"):
        prepare_state_dict(_model(embed_dim=24, img_size=64).state_dict(), _model(embed_dim=16))
    with pytest.raises(TypeError):
        load_checkpoint(_model(), [1, 2])


def test_non_strict_and_skip_mismatched_head():
    src, dst = _model(num_classes=10), _model(num_classes=3)
    with pytest.raises(ValueError, match="head.weight"):
        load_checkpoint(dst, src.state_dict())
    head_before = dst.head.weight.clone()
    load_checkpoint(dst, src.state_dict(), skip_mismatched_head=True)
    assert torch.equal(dst.head.weight, head_before) and torch.equal(dst.pos_embed, src.pos_embed)
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("layers.1.")}
    result = load_checkpoint(_model(num_classes=10), partial, strict=False)
    assert any(k.startswith("layers.1.") for k in result.missing_keys)


def test_timm_pretrained_from_local_file(tmp_path):
    src = _model()
    path = tmp_path / "vim.pth"
    torch.save({"model": src.state_dict()}, path)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, img_size=64, **TINY,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    assert torch.equal(model.layers[1].mixer.A_log, src.layers[1].mixer.A_log)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(src.pos_embed, 4))


# -- fine-tuning from a checkpoint (init_from_checkpoint, train --init-from) ------------------------

def test_init_from_checkpoint_drops_what_another_class_count_changes(tmp_path):
    src, dst = _model(num_classes=10), _model(num_classes=3)
    path = tmp_path / "src.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(nb_classes=10)}, path)
    lines = []
    init_from_checkpoint(dst, path, log=lines.append)
    assert len(lines) == 1
    assert str(path) in lines[0] and "head.weight 10x16 -> 3x16" in lines[0] and "head.bias 10 -> 3" in lines[0]
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(dst.state_dict()[k], v), k
    lines.clear()
    init_from_checkpoint(_model(num_classes=10), path, log=lines.append)  # same classes: nothing dropped
    assert lines == []
    with pytest.raises(ValueError, match="A_log"):  # the backbone must still match
        init_from_checkpoint(_model(num_classes=3, d_state=8), path)


def test_init_from_checkpoint_with_another_register_layout():
    reg = dict(num_registers=2, cls_reduce=2)
    src = _model("mambar_small_patch16_224", img_size=64, **reg)
    dst = _model("mambar_small_patch16_224", img_size=64, num_registers=4, cls_reduce=2)
    lines = []
    init_from_checkpoint(dst, {"model": src.state_dict()}, log=lines.append)
    (line,) = lines
    for key in ("cls_token 1x2x16 -> 1x4x16", "pos_embed_cls", "norm_neck.weight 16 -> 32", "head.weight 3x16 -> 3x32"):
        assert key in line, (key, line)
    assert "neck.weight" not in line.replace("norm_neck.weight", "")  # 16 -> 8 both: loaded
    assert torch.equal(dst.neck.weight, src.neck.weight) and torch.equal(dst.pos_embed, src.pos_embed)
    # a model without a neck (cls_reduce 1): the checkpoint's neck is dropped as "not in the model"
    lines.clear()
    init_from_checkpoint(_model("mambar_small_patch16_224", img_size=64, num_registers=2, cls_reduce=1),
                         {"model": src.state_dict()}, log=lines.append)
    assert "neck.weight 8x16 (not in the model)" in lines[0]


def test_train_init_from_prints_one_line_naming_the_dropped_entries(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from shufflemamba.cli import main

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            os.makedirs(tmp_path / "data" / split / f"c{c}")
            for i in range(4):
                img = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    kw = dict(patch_size=4, embed_dim=16, depth=2, d_state=4)
    src = timm.create_model("vim_tiny_patch16_224", img_size=32, num_classes=10, **kw)  # another size and head
    ckpt = tmp_path / "official.pth"
    torch.save({"model": src.state_dict(), "model_ema": src.state_dict(), "args": argparse.Namespace()}, ckpt)
    args = ["train", "--data-dir", str(tmp_path / "data"), "--model", "vim_tiny_patch16_224", "--model-kwargs",
            *(f"{k}={v}" for k, v in kw.items()), "--img-size", "16", "--batch-size", "6", "--epochs", "1",
            "--workers", "0", "--output", str(tmp_path / "run"), "--init-from", str(ckpt)]
    assert main(args) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if "fine-tuning from" in line]
    assert len(out) == 1 and "head.weight 10x16 -> 3x16" in out[0] and "head.bias" in out[0]
    bad = tmp_path / "bad.pth"
    torch.save({"model": timm.create_model("vim_tiny_patch16_224", img_size=16, **{**kw, "depth": 3}).state_dict()},
               bad)
    assert main(args[:-1] + [str(bad), "--overwrite"]) != 0
    err = capsys.readouterr().err
    assert "does not fit model" in err and "Traceback" not in err
