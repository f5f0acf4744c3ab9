"""Register-token models (Mamba-Reg, used by ShuffleMamba's Reg recipe): layout, head, names, loading."""

from __future__ import annotations

import pytest
import torch

import shufflemamba  # noqa: F401  (registers the models; before timm)
import timm
from shufflemamba.models import VisionMambaReg, prepare_state_dict, register_positions

SMALL = dict(img_size=64, patch_size=16, embed_dim=16, depth=2, d_state=4, num_classes=5)  # 16 patches


def test_register_positions_of_the_reference_layouts():
    # 224 px, patch 16: 196 patches; groups of 15 (12 registers) or 11 (16 registers)
    assert register_positions(196, 12) == list(range(15, 192, 16))
    assert register_positions(196, 16) == list(range(11, 192, 12))
    # stage 1 of the Reg recipe: 128 px -> 64 patches, groups of 4
    assert register_positions(64, 12) == list(range(4, 60, 5))
    with pytest.raises(ValueError, match="at least 13 patches"):
        register_positions(12, 12)


def test_state_dict_keys_are_the_reference_names():
    top = {"cls_token", "pos_embed_cls", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm_f.weight", "head.weight", "head.bias"}
    base = timm.create_model("mambar_base_patch16_224", **SMALL, num_registers=3)
    tiny = timm.create_model("mambar_tiny_patch16_224", **SMALL, num_registers=3)
    assert {k for k in base.state_dict() if not k.startswith("layers.")} == top | {"neck.weight", "norm_neck.weight"}
    assert {k for k in tiny.state_dict() if not k.startswith("layers.")} == top  # cls_reduce 1: no neck
    assert set(base.state_dict()) - top - {"neck.weight", "norm_neck.weight"} == set(tiny.state_dict()) - top
    assert base.cls_token.shape == (1, 3, 16) and base.pos_embed.shape == (1, 16, 16)
    assert base.pos_embed_cls.shape == (1, 3, 16)
    assert base.neck.weight.shape == (4, 16) and base.neck.bias is None  # 16 / cls_reduce 4
    assert base.head.weight.shape == (5, 12) and base.num_features == 12


def test_registers_sit_at_their_positions_and_patches_keep_their_order():
    model = timm.create_model("mambar_small_patch16_224", **SMALL, num_registers=3).eval()
    M, R = 16, 3
    patches, regs = torch.arange(M).float(), 100 + torch.arange(R).float()
    seq = torch.cat((patches, regs))[model.token_order]  # what forward_features builds, on labels
    assert seq[model.register_index].tolist() == regs.tolist()
    keep = torch.ones(M + R, dtype=torch.bool)
    keep[model.register_index] = False
    assert seq[keep].tolist() == patches.tolist()
    assert model.register_index == [4, 9, 14]  # groups of 16 // 4 = 4 patches; one patch left at the end


def test_forward_head_reads_the_registers_through_neck_and_norm():
    model = timm.create_model("mambar_base_patch16_224", **SMALL, num_registers=3).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 19, 16)
    regs = feats[:, model.register_index]  # (2, 3, 16)
    expected = model.norm_neck(model.neck(regs).flatten(1))  # (2, 12)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), expected)
    torch.testing.assert_close(model(x), model.head(expected))
    # cls_reduce 1 (tiny): no neck, the features are the register outputs concatenated
    tiny = timm.create_model("mambar_tiny_patch16_224", **SMALL, num_registers=3).eval()
    torch.testing.assert_close(tiny.forward_head(tiny.forward_features(x), pre_logits=True),
                               tiny.forward_features(x)[:, tiny.register_index].flatten(1))


def test_slws_moves_registers_unless_kept():
    moved = timm.create_model("mambar_base_patch16_224", **SMALL, num_registers=3, slws_rate=0.5)
    kept = timm.create_model("mambar_base_patch16_224", **SMALL, num_registers=3, slws_rate=0.5, slws_keep_cls=True)
    assert moved.layers[-1].slws_keep_positions is None
    assert tuple(kept.layers[-1].slws_keep_positions) == tuple(kept.register_index)
    assert kept.slws_rates[-1] == pytest.approx(0.5)


def test_pos_embed_resized_between_stages_registers_untouched():
    """Reg recipe: stage 1 at a small size, stage 2 at a larger one (here 64 -> 96 px: 4x4 -> 6x6)."""
    small = timm.create_model("mambar_base_patch16_224", **SMALL, num_registers=3)
    big = timm.create_model("mambar_base_patch16_224", **{**SMALL, "img_size": 96}, num_registers=3)
    state = prepare_state_dict({"model": small.state_dict()}, big)
    assert state["pos_embed"].shape == (1, 36, 16)
    big.load_state_dict(state, strict=True)
    torch.testing.assert_close(big.pos_embed_cls, small.pos_embed_cls)
    torch.testing.assert_close(big.cls_token, small.cls_token)
    assert torch.isfinite(big(torch.randn(1, 3, 96, 96))).all()


def test_rebuild_from_model_kwargs_and_bad_arguments():
    a = timm.create_model("mambar_small_patch16_224", **SMALL, num_registers=3)
    assert a.model_kwargs["num_registers"] == 3 and a.model_kwargs["cls_reduce"] == 2
    b = VisionMambaReg(**a.model_kwargs)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError, match="cls_reduce 3 must divide embed_dim 16"):
        VisionMambaReg(**{**a.model_kwargs, "cls_reduce": 3})
    with pytest.raises(ValueError, match="num_registers must be a positive int"):
        VisionMambaReg(**{**a.model_kwargs, "num_registers": 0})
    with pytest.raises(ValueError, match="registers need at least"):
        VisionMambaReg(**{**a.model_kwargs, "num_registers": 16})
    assert "pos_embed_cls" in a.no_weight_decay()
