"""Any input size (dynamic_img_size), forward_intermediates and features_only, as timm's ViT has them."""

from __future__ import annotations

import pytest
import shufflemamba  # noqa: F401  (registers the models in timm)
import timm
import torch
from shufflemamba.models import resize_pos_embed
from shufflemamba.models.vim_reg import register_positions

SMALL = dict(img_size=64, patch_size=16, embed_dim=16, depth=3, d_state=4, num_classes=3)
# one model per family: Vim (middle class token), ShuffleMamba (class token at the head), Mamba-Reg
FAMILIES = [("vim_tiny_patch16_224", {}), ("shufflemamba_base_patch16_224", {}),
            ("mambar_small_patch16_224", dict(num_registers=3, cls_reduce=2))]


def _model(name, extra, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **extra, **kw})


@pytest.mark.parametrize("name,extra", FAMILIES)
def test_dynamic_img_size_equals_a_model_built_at_that_size(name, extra):
    dyn = _model(name, extra, dynamic_img_size=True)
    x = torch.randn(2, 3, 48, 80)  # grid 3 x 5 instead of the built 4 x 4
    out = dyn(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert dyn.pos_embed.grad is not None and dyn.pos_embed.grad.abs().sum() > 0
    # the reference: a model built at 48 x 80 whose pos_embed is the resized one
    ref = _model(name, extra, img_size=(48, 80))
    state = dict(dyn.state_dict())
    cls_position = None if name.startswith("mambar") else dyn.cls_position
    state["pos_embed"] = resize_pos_embed(dyn.pos_embed.detach(), (3, 5), (4, 4), cls_position)
    ref.load_state_dict(state)
    dyn.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), ref(x))
        torch.testing.assert_close(dyn.forward_features(x), ref.forward_features(x))
        # at the built size nothing is resized
        y = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(dyn(y), _model(name, extra)(y))


def test_dynamic_size_moves_the_middle_class_token_and_the_registers():
    vim = _model("vim_tiny_patch16_224", {}, dynamic_img_size=True).eval()
    feats = vim.forward_features(torch.randn(1, 3, 48, 80))  # 15 patches: class token at 7
    assert feats.shape == (1, 16, 16)
    torch.testing.assert_close(vim.forward_head(feats, pre_logits=True), feats[:, 7])
    reg = _model("mambar_tiny_patch16_224", dict(num_registers=3), dynamic_img_size=True).eval()
    feats = reg.forward_features(torch.randn(1, 3, 48, 80))  # 15 patches + 3 registers
    assert feats.shape == (1, 18, 16) and register_positions(15, 3) == [3, 7, 11]
    torch.testing.assert_close(reg.forward_head(feats, pre_logits=True), feats[:, [3, 7, 11]].flatten(1))


def test_without_dynamic_img_size_other_sizes_raise_and_pad_covers_any_size():
    model = _model("vim_tiny_patch16_224", {})
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 48, 48))
    dyn = _model("vim_tiny_patch16_224", {}, dynamic_img_size=True)
    with pytest.raises(ValueError, match="dynamic_img_pad=True"):
        dyn(torch.randn(1, 3, 50, 48))
    padded = _model("vim_tiny_patch16_224", {}, dynamic_img_size=True, dynamic_img_pad=True).eval()
    assert padded.patch_embed.feat_size((50, 40)) == (4, 3)
    x = torch.randn(1, 3, 50, 40)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), padded(torch.nn.functional.pad(x, (0, 8, 0, 14))))
    assert padded.model_kwargs["dynamic_img_size"] is True  # rebuilds with it


@pytest.mark.parametrize("name,extra", FAMILIES)
def test_forward_intermediates_are_the_block_outputs_without_prefix_tokens(name, extra):
    model = _model(name, extra, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 48, 64)  # grid 3 x 4
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, -1])
        assert [t.shape for t in inter] == [(2, 16, 3, 4)] * 2
        torch.testing.assert_close(final, model.forward_features(x))
        # the last block's normalised output is forward_features' sequence without the prefix tokens
        last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        prefix = model._prefix_positions(12)
        keep = [i for i in range(final.shape[1]) if i not in prefix]
        torch.testing.assert_close(last[0], final[:, keep])
        # NCHW is the NLC sequence in raster order
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(inter[0], nlc.reshape(2, 3, 4, 16).permute(0, 3, 1, 2))
        pairs = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, intermediates_only=True)
        assert pairs[0][1].shape == (2, len(prefix), 16)
        out = model.forward_intermediates(x, indices=1, output_dict=True, return_prefix_tokens=True)
        assert set(out) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_what_the_indices_need():
    model = _model("mambar_small_patch16_224", dict(num_registers=3, cls_reduce=2)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, -2], prune_norm=True) == [0, 1]
        assert len(model.layers) == 2 and not hasattr(model, "neck") and model.num_classes == 0
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,extra", FAMILIES)
def test_features_only_builds_a_backbone_whose_maps_backprop(name, extra):
    model = _model(name, {k: v for k, v in extra.items()}, features_only=True, out_indices=(0, 2),
                   dynamic_img_size=True)
    assert model.feature_info.channels() == [16, 16] and model.feature_info.reduction() == [16, 16]
    assert model.feature_info.module_name() == ["layers.0", "layers.2"]
    feats = model(torch.randn(2, 3, 64, 96))
    assert [f.shape for f in feats] == [(2, 16, 4, 6)] * 2
    sum(f.square().mean() for f in feats).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["model.layers.2.mixer.in_proj.weight"].abs().sum() > 0
    # pruned: no head, no final norm, no neck (nothing left without a gradient)
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # the default out_indices are the last three blocks, as timm's ViT
    default = _model(name, extra, features_only=True)
    assert default.feature_info.module_name() == ["layers.0", "layers.1", "layers.2"]


def test_strided_patch_embedding_reports_its_reduction():
    model = _model("vim_tiny_patch16_224", {}, stride=8, features_only=True, out_indices=[1])
    assert model.feature_info.reduction() == [8]
    assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 16, 7, 7)
