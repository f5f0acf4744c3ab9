"""Weight-decay parameter groups (shufflemamba.optim) on real, small Vim and Mamba-Reg models."""

from __future__ import annotations

import pytest
import torch

import shufflemamba  # noqa: F401  (first: its torchvision shim lets timm import; registers the models)
import timm  # noqa: I001
from shufflemamba.training.optim import no_weight_decay_names, param_groups_weight_decay

SMALL = dict(img_size=64, patch_size=16, embed_dim=16, depth=2, d_state=4, num_classes=5)

# What the reference models' no_weight_decay() return (the skip list timm 0.4.12's add_weight_decay
# receives): hustvl/Vim vim/models_mamba.py and ShuffleMamba models_reg.py / models_shuffle.py.
REF_SKIP_VIM = {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}
REF_SKIP_REG = {"pos_embed", "cls_token", "pos_embed_cls"}


def _vim(cls_position: str = "middle") -> torch.nn.Module:
    return timm.create_model("vim_tiny_patch16_224", **SMALL, cls_position=cls_position)


def _reg() -> torch.nn.Module:
    return timm.create_model("mambar_base_patch16_224", **SMALL, num_registers=3)


def _decayed(model: torch.nn.Module, grouping: str) -> set[str]:
    groups = param_groups_weight_decay(model, weight_decay=0.05, grouping=grouping)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    ids = {id(p) for p in groups[1]["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _timm_0412_decayed(model: torch.nn.Module, skip: set[str]) -> set[str]:
    # timm 0.4.12 add_weight_decay, restated: exempt len(shape) == 1, '.bias', or a skip-list name
    return {n for n, p in model.named_parameters() if not (p.ndim == 1 or n.endswith(".bias") or n in skip)}


@pytest.mark.parametrize("cls_position", ["middle", "head"])
def test_reference_grouping_on_vim(cls_position):
    model = _vim(cls_position)
    names = dict(model.named_parameters())
    assert not any(p.ndim == 0 for p in names.values())  # where timm 0.4.12 and 1.x would differ
    decayed = _decayed(model, "reference")
    assert decayed == _timm_0412_decayed(model, REF_SKIP_VIM)
    for i in range(2):
        mixer = f"layers.{i}.mixer."
        assert {mixer + "A_log", mixer + "A_b_log", mixer + "in_proj.weight", mixer + "x_proj.weight"} <= decayed
        assert not {mixer + "D", mixer + "D_b", mixer + "dt_proj.bias", mixer + "conv1d.bias"} & decayed
        assert f"layers.{i}.norm.weight" not in decayed
    assert not {"pos_embed", "cls_token", "norm_f.weight", "head.bias"} & decayed
    assert {"patch_embed.proj.weight", "head.weight"} <= decayed


def test_mamba_grouping_on_vim_matches_the_previous_rule():
    from timm.optim import param_groups_weight_decay as timm_groups

    model = _vim()
    decayed = _decayed(model, "mamba")
    assert not {n for n in decayed if n.endswith(("A_log", "A_b_log", ".D", ".D_b"))}
    assert not {"pos_embed", "cls_token"} & decayed
    assert "layers.0.mixer.in_proj.weight" in decayed
    # the grouping train.py used before wd_grouping existed: timm 1.x with model.no_weight_decay()
    before = timm_groups(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())
    assert decayed == {n for n, p in model.named_parameters() if any(p is q for q in before[1]["params"])}
    # the two rules differ exactly by the SSM A matrices
    assert _decayed(model, "reference") - decayed == {f"layers.{i}.mixer.{a}" for i in range(2) for a in ("A_log", "A_b_log")}


def test_register_model_tokens_never_decayed():
    model = _reg()
    names = set(dict(model.named_parameters()))
    assert {"pos_embed", "pos_embed_cls", "cls_token", "neck.weight", "norm_neck.weight"} <= names
    ref = _decayed(model, "reference")
    assert ref == _timm_0412_decayed(model, REF_SKIP_REG)
    for grouping in ("reference", "mamba"):
        decayed = _decayed(model, grouping)
        assert not {"pos_embed", "pos_embed_cls", "cls_token", "norm_neck.weight"} & decayed
        assert "neck.weight" in decayed
        assert not {n for n in decayed if n.endswith((".D", ".D_b"))}
    assert "layers.0.mixer.A_log" in ref and "layers.0.mixer.A_log" not in _decayed(model, "mamba")


def test_groups_hold_every_trainable_parameter_once_and_skip_frozen():
    model = _vim()
    model.patch_embed.proj.weight.requires_grad_(False)
    groups = param_groups_weight_decay(model, weight_decay=0.1, grouping="reference")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert "patch_embed.proj.weight" not in no_weight_decay_names(model, grouping="reference")
    torch.optim.AdamW(groups, lr=1e-3)  # a valid optimiser argument


def test_unknown_grouping_rejected():
    with pytest.raises(ValueError, match="grouping"):
        no_weight_decay_names(_vim(), grouping="ours")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    import os

    import numpy as np
    from PIL import Image

    root = str(tmp_path_factory.mktemp("optim_imgs"))
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(2):
                Image.fromarray(np.full((16, 16, 3), 70 * i, np.uint8)).save(os.path.join(root, split, c, f"{i}.png"))
    return root


@pytest.mark.parametrize("grouping, decayed_a", [("reference", True), ("mamba", False)])
def test_training_run_uses_the_configured_grouping(grouping, decayed_a, images, tmp_path, capsys):
    """The optimizer a real `shufflemamba train` run saves has the groups wd_grouping asks for."""
    import yaml

    from shufflemamba.cli import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"wd_grouping": grouping, "weight_decay": 0.07}))
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg_path), "--data-dir", images, "--model", "vim_tiny_patch16_224",
            "--model-kwargs", "patch_size=4", "embed_dim=16", "depth=1", "d_state=4", "--img-size", "16",
            "--batch-size", "2", "--epochs", "1", "--workers", "0", "--device", "cpu", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    groups = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.07]
    model = timm.create_model("vim_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1, d_state=4, num_classes=2)
    expected = param_groups_weight_decay(model, weight_decay=0.07, grouping=grouping)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in expected]
    # torch numbers the saved parameters consecutively through the groups, in group order
    order = [n for g in expected for q in g["params"] for n, p in model.named_parameters() if p is q]
    decayed = {order[i] for i in groups[1]["params"]}
    assert ("layers.0.mixer.A_log" in decayed) is decayed_a and ("layers.0.mixer.A_b_log" in decayed) is decayed_a
    assert "layers.0.mixer.D" not in decayed and "pos_embed" not in decayed


@pytest.mark.parametrize("opt, fused", [("adamw", True), ("adam", True), ("sgd", None)])
def test_adam_optimizers_are_torchs_fused_kernels(opt, fused):
    """AdamW / Adam run torch's fused kernel (one per parameter); its update equals the plain rule."""
    from shufflemamba.training.config import DEFAULTS
    from shufflemamba.training.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    cfg = {**DEFAULTS, "opt": opt, "weight_decay": 0.05}
    optimizer = build_optimizer(model, cfg, lr=1e-2)
    assert optimizer.defaults.get("fused") == fused
    if fused:
        ref_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
        ref_model.load_state_dict(model.state_dict())
        ref = build_optimizer(ref_model, cfg, lr=1e-2)
        for group in ref.param_groups:
            group["fused"], group["foreach"] = None, False  # the single-tensor reference loop
        x = torch.randn(8, 6)
        for m, o in ((model, optimizer), (ref_model, ref)):
            for _ in range(3):
                o.zero_grad()
                m(x).square().sum().backward()
                o.step()
        for a, b in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_adam_is_chosen_only_for_float_cpu_or_cuda_parameters():
    """The predicate training and `shufflemamba bench` share: integer or meta tensors rule fused AdamW out."""
    from shufflemamba.training.optim import fused_adam_supported

    assert fused_adam_supported([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])
    assert not fused_adam_supported([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    assert not fused_adam_supported([torch.zeros(2, device="meta")])
