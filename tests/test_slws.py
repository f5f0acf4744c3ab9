"""Tests of Stochastic Layer-Wise Shuffle (shufflemamba.slws) on plain layers, timm ViT and Vim."""

from __future__ import annotations

import copy
import math

import pytest
import shufflemamba  # noqa: F401  (before timm: torchvision shim, model registration)
import timm
import torch
from shufflemamba.slws import LayerShuffle, ShuffledLayer, apply_slws, shuffle_rates
from torch import nn


class Spy(nn.Module):
    """Token-wise identity that records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, *rest, **kwargs):
        self.seen.append(x.detach().clone())
        return x if not rest else (x, *rest)


def _tokens(b=2, n=12, c=3):
    # distinct values per position, so any move is visible
    return torch.arange(b * n * c, dtype=torch.float32).reshape(b, n, c)


def _was_shuffled(seen, x):
    return not torch.equal(seen, x)


# -- shuffle_rates ---------------------------------------------------------------------------------

def test_shuffle_rates_linear_matches_linspace():
    rates = shuffle_rates(0.5, 5)
    assert rates == pytest.approx(torch.linspace(0, 0.5, 5).tolist())
    assert rates[0] == 0.0 and rates[-1] == 0.5


def test_shuffle_rates_constant_and_depth_one():
    assert shuffle_rates(0.3, 4, "constant") == [0.0, 0.3, 0.3, 0.3]
    assert shuffle_rates(0.9, 1) == [0.0]


@pytest.mark.parametrize("args", [(1.5, 4), (-0.1, 4), (0.5, 0), (0.5, 4, "cosine")])
def test_shuffle_rates_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        shuffle_rates(*args)


def test_layer_shuffle_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rate"):
        LayerShuffle(nn.Identity(), 1.2)
    with pytest.raises(TypeError):
        LayerShuffle(lambda x: x, 0.5)
    with pytest.raises(TypeError):
        LayerShuffle(nn.Identity(), 0.5, generator=123)


def test_repr_shows_rate():
    r = repr(LayerShuffle(nn.Identity(), 0.25, keep_positions=[0]))
    assert "rate=0.25" in r and "keep_positions=[0]" in r


# -- exact restoration -----------------------------------------------------------------------------

@pytest.mark.parametrize("make_layer", [lambda: nn.Linear(6, 5), lambda: nn.LayerNorm(6)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_restoration_matches_the_unshuffled_layer_for_tokenwise_layers(make_layer, per_sample):
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))  # LayerNorm starts at ones/zeros: make its grads informative
    wrapped = LayerShuffle(copy.deepcopy(layer), 1.0, per_sample=per_sample).train()
    spy = Spy()
    wrapped.module.register_forward_hook(lambda m, i, o: spy.seen.append(i[0].detach().clone()))
    x = torch.randn(3, 10, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = layer(x), wrapped(x2)
    assert _was_shuffled(spy.seen[0], x.detach())  # the layer really saw another order
    # equal up to rounding: a BLAS may block rows differently once they are permuted, which changes
    # the summation order of a row's dot products (seen once in CI-like runs: a last-bit difference)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-6, atol=1e-6)
    for p_ref, p in zip(layer.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-6)


def test_shuffle_is_a_permutation_of_tokens_shared_by_the_batch():
    spy = Spy()
    layer = LayerShuffle(spy, 1.0, generator=torch.Generator().manual_seed(3)).train()
    x = _tokens(b=2, n=16)
    assert torch.equal(layer(x), x)
    seen = spy.seen[0]
    assert _was_shuffled(seen, x)
    perm = (seen[:, :, 0] - x[:, :1, 0]) / 3  # recover the token index from its value
    assert torch.equal(perm[0], perm[1])  # one permutation for the whole batch
    assert sorted(perm[0].long().tolist()) == list(range(16))


def test_multiple_token_arguments_and_tuple_outputs_are_restored():
    class Pair(nn.Module):
        def forward(self, h, r, scale, flag=None):
            # order-sensitive: cumulative sum along tokens, plus a non-token argument
            return torch.cumsum(h, 1) * scale, (None if r is None else r + 1), flag

    layer = LayerShuffle(Pair(), 1.0, generator=torch.Generator().manual_seed(0)).train()
    h, r = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    out_h, out_r, flag = layer(h, r, torch.tensor(2.0), flag="kw")
    assert flag == "kw"
    torch.testing.assert_close(out_r, r + 1)  # token-wise part: exactly restored
    assert not torch.allclose(out_h, torch.cumsum(h, 1) * 2)  # order-sensitive part changed
    # the token that came last in the shuffled order carries the full sum, restored to its own place
    last = (out_h - 2 * h.sum(1, keepdim=True)).abs().amax(-1).min(dim=1).values  # (B,)
    assert (last < 1e-5).all()
    out_h2, out_r2, _ = layer(h, None, 1.0)
    assert out_r2 is None and out_h2.shape == h.shape


# -- when and how often ----------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.0, 0.3, 0.8])
def test_shuffle_frequency_matches_rate(rate):
    spy, n_calls = Spy(), 400
    layer = LayerShuffle(spy, rate, generator=torch.Generator().manual_seed(1)).train()
    x = _tokens(b=1, n=10)
    for _ in range(n_calls):
        layer(x)
    # a permutation of 10 tokens equals the identity with probability 1/10!: negligible
    count = sum(_was_shuffled(s, x) for s in spy.seen)
    sd = math.sqrt(n_calls * rate * (1 - rate))
    assert abs(count - n_calls * rate) <= 5 * sd + 1e-9


def test_never_shuffles_in_eval_mode():
    spy = Spy()
    layer = LayerShuffle(spy, 1.0).eval()
    x = _tokens()
    for _ in range(20):
        layer(x)
    assert all(torch.equal(s, x) for s in spy.seen)


def test_generator_makes_draws_reproducible():
    def run(seed):
        spy = Spy()
        layer = LayerShuffle(spy, 0.5, generator=torch.Generator().manual_seed(seed)).train()
        for _ in range(12):
            layer(_tokens(n=20))
        return torch.stack(spy.seen)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_keep_positions_are_never_moved():
    spy = Spy()
    layer = LayerShuffle(spy, 1.0, keep_positions=[0, 5, -1], generator=torch.Generator().manual_seed(0)).train()
    x = _tokens(b=2, n=12)
    for _ in range(10):
        layer(x)
    for seen in spy.seen:
        for p in (0, 5, 11):
            assert torch.equal(seen[:, p], x[:, p])
        assert _was_shuffled(seen, x)
    with pytest.raises(ValueError, match="out of range"):
        LayerShuffle(Spy(), 1.0, keep_positions=[40]).train()(x)


def test_per_sample_draws_differ_within_batch():
    spy = Spy()
    layer = LayerShuffle(spy, 0.5, per_sample=True, generator=torch.Generator().manual_seed(0)).train()
    x = _tokens(b=64, n=8)
    assert torch.equal(layer(x), x)
    moved = torch.tensor([_was_shuffled(spy.seen[0][i], x[i]) for i in range(64)])
    assert 10 < int(moved.sum()) < 54  # some samples shuffled, some not, in one forward
    perms = {tuple(spy.seen[0][i, :, 0].tolist()) for i in range(64) if moved[i]}
    assert len(perms) > 1  # different permutations per sample


def test_per_sample_with_keep_positions():
    spy = Spy()
    layer = LayerShuffle(spy, 1.0, per_sample=True, keep_positions=[3],
                         generator=torch.Generator().manual_seed(0)).train()
    x = _tokens(b=4, n=9)
    assert torch.equal(layer(x), x)
    assert torch.equal(spy.seen[0][:, 3], x[:, 3]) and _was_shuffled(spy.seen[0], x)


def test_deepcopy_keeps_settings():
    layer = LayerShuffle(nn.Linear(3, 3), 0.4, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(layer)  # model EMA deep-copies the model
    assert twin.slws_rate == 0.4 and twin.slws_generator is not None


# -- apply_slws on block lists ---------------------------------------------------------------------

def test_apply_slws_wraps_in_place_and_keeps_state_dict_keys():
    blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(4)])
    keys = list(blocks.state_dict())
    plain = copy.deepcopy(blocks)
    rates = apply_slws(blocks, 0.6, schedule="constant")
    assert rates == [0.0, 0.6, 0.6, 0.6]
    assert all(isinstance(b, LayerShuffle) for b in blocks)
    assert [b.slws_rate for b in blocks] == rates
    assert list(blocks.state_dict()) == keys  # no "module." level in checkpoints
    blocks.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(blocks.state_dict(), strict=True)
    # applying again reconfigures, it does not wrap twice
    apply_slws(blocks, 0.2)
    assert all(not isinstance(b.module, LayerShuffle) for b in blocks)
    assert blocks[-1].slws_rate == pytest.approx(0.2)


def test_apply_slws_rejects_bad_arguments():
    with pytest.raises(TypeError):
        apply_slws([nn.Identity()], 0.5)
    with pytest.raises(TypeError, match="unknown option"):
        apply_slws(nn.ModuleList([nn.Identity()]), 0.5, perm="x")


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=4)


def test_timm_vit_blocks_with_slws_train_and_are_equivariant():
    torch.manual_seed(0)
    vit = _tiny_vit()
    ref = copy.deepcopy(vit).train()
    apply_slws(vit.blocks, 1.0, schedule="constant", generator=torch.Generator().manual_seed(0))
    vit.train()
    x = torch.randn(2, 3, 32, 32)
    # attention without relative position bias and token-wise MLPs are permutation-equivariant:
    # with exact order restoration the shuffled network computes the same function
    torch.testing.assert_close(vit(x), ref(x), rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(vit(x), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in vit.parameters())
    opt.step()
    assert ref.state_dict().keys() == vit.state_dict().keys()
    ref.load_state_dict(vit.state_dict(), strict=True)


# -- our models use the same mechanism -------------------------------------------------------------

def _tiny_vim(**kw):
    args = dict(img_size=32, patch_size=16, embed_dim=16, depth=3, d_state=4, num_classes=3)
    return timm.create_model("vim_tiny_patch16_224", **{**args, **kw})


def test_vim_blocks_are_shuffled_layers_configured_by_slws_rate():
    model = _tiny_vim(slws_rate=0.5)
    assert all(isinstance(b, ShuffledLayer) for b in model.layers)
    assert [b.slws_rate for b in model.layers] == pytest.approx([0.0, 0.25, 0.5])
    assert model.slws_rates == pytest.approx([0.0, 0.25, 0.5])
    constant = _tiny_vim(slws_rate=0.4, slws_schedule="constant")
    assert [b.slws_rate for b in constant.layers] == pytest.approx([0.0, 0.4, 0.4])
    with pytest.raises(ValueError, match="slws_schedule"):
        _tiny_vim(slws_schedule="step")


def test_vim_eval_output_does_not_depend_on_slws_rate():
    torch.manual_seed(0)
    a = _tiny_vim(slws_rate=0.0).eval()
    b = _tiny_vim(slws_rate=1.0).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_vim_train_mode_rate_one_differs_from_rate_zero():
    torch.manual_seed(0)
    a = _tiny_vim(slws_rate=0.0, slws_schedule="constant").train()
    b = _tiny_vim(slws_rate=1.0, slws_schedule="constant").train()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    # the scan is order-sensitive, so a shuffled sequence gives a different output
    assert not torch.allclose(a(x), b(x), atol=1e-4)


def test_vim_shuffle_with_grad_checkpointing_reuses_the_permutation():
    torch.manual_seed(0)
    model = _tiny_vim(slws_rate=1.0, slws_schedule="constant").train()
    x = torch.randn(2, 3, 32, 32)

    def run(ckpt):
        model.set_grad_checkpointing(ckpt)
        model.set_slws(1.0, "constant", generator=torch.Generator().manual_seed(5))
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out0, g0 = run(False)
    out1, g1 = run(True)
    torch.testing.assert_close(out1, out0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
