"""boost, model_replacement, sign_flip, scaling, untargeted, gaussian, layer_gaussian."""
from __future__ import annotations

import pytest
import torch

from attacks import build_attack


def test_boost_scales_by_lambda(make_ctx):
    ctx = make_ctx()
    assert torch.allclose(build_attack("boost", {}).craft(ctx), 10.0 * ctx.own)
    assert torch.allclose(build_attack("boost", {"lam": 3}).craft(ctx), 3.0 * ctx.own)
    assert torch.allclose(build_attack("boost", {"lam": 3, "keep_base": True}).craft(ctx), 4.0 * ctx.own)


def test_model_replacement_factor(make_ctx):
    ctx = make_ctx(n=10, f=2)
    attack = build_attack("model_replacement", {})
    assert attack.factor(ctx) == pytest.approx(4.0)  # (10 - 2) / 2
    assert torch.allclose(attack.craft(ctx), 4.0 * ctx.own)
    fixed = build_attack("model_replacement", {"n": 20, "p": 5, "keep_base": True})
    assert torch.allclose(fixed.craft(ctx), 4.0 * ctx.own)  # 1 + 15/5 = n/p


def test_model_replacement_restores_adversary_model_under_fedavg(make_ctx):
    """keep_base: with converged benign clients (zero deltas), the mean is the adversary's delta."""
    n, p = 10, 2
    ctx = make_ctx(n=n, f=p)
    crafted = build_attack("model_replacement", {"keep_base": True}).craft(ctx)
    rows = torch.cat([torch.zeros(n - p, ctx.dim), crafted.expand(p, -1)])
    assert torch.allclose(rows.mean(0), ctx.own, atol=1e-6)


def test_sign_flip_negates_and_scaling_scales(make_ctx):
    ctx = make_ctx()
    assert torch.equal(build_attack("sign_flip", {}).craft(ctx), -ctx.own)
    assert torch.allclose(build_attack("sign_flip", {"scale": 2.5}).craft(ctx), -2.5 * ctx.own)
    assert torch.allclose(build_attack("scaling", {"factor": -3}).craft(ctx), -3.0 * ctx.own)


def test_untargeted_definition_and_seeding(make_ctx):
    tau = 10.0
    a = build_attack("untargeted", {}).craft(make_ctx(seed=5))
    w_prime = torch.randn(40, generator=torch.Generator().manual_seed(5))
    ctx = make_ctx()
    assert torch.allclose(a, tau * (w_prime - ctx.global_weights))
    assert torch.equal(a, build_attack("untargeted", {}).craft(make_ctx(seed=5)))
    assert not torch.equal(a, build_attack("untargeted", {}).craft(make_ctx(seed=6)))


def test_gaussian_moments_and_seeding(make_ctx):
    big = make_ctx(own=None, colluders=None, honest=None, slices=None, global_weights=torch.zeros(20000))
    out = build_attack("gaussian", {"mu": 2.0, "sigma": 0.5}).craft(big)
    assert out.shape == (20000,) and out.dtype == torch.float32
    assert float(out.mean()) == pytest.approx(2.0, abs=0.02)
    assert float(out.std()) == pytest.approx(0.5, rel=0.03)
    g = build_attack("gaussian", {})
    assert torch.equal(g.craft(make_ctx(seed=1)), g.craft(make_ctx(seed=1)))
    assert not torch.equal(g.craft(make_ctx(seed=1)), g.craft(make_ctx(seed=2)))


def test_layer_gaussian_changes_only_the_largest_layer_with_its_moments():
    from attacks import AttackContext

    g = torch.Generator().manual_seed(0)
    own = torch.cat([torch.zeros(10), 3.0 + 2.0 * torch.randn(5000, generator=g), torch.ones(6)])
    slices = [slice(0, 10), slice(10, 5010), slice(5010, 5016)]
    ctx = AttackContext(n=5, f=1, generator=torch.Generator().manual_seed(1), own=own, slices=slices)
    out = build_attack("layer_gaussian", {}).craft(ctx)
    assert torch.equal(out[:10], own[:10]) and torch.equal(out[5010:], own[5010:])
    layer = out[10:5010]
    assert not torch.equal(layer, own[10:5010])
    assert float(layer.mean()) == pytest.approx(float(own[10:5010].mean()), abs=0.1)
    assert float(layer.std()) == pytest.approx(float(own[10:5010].std()), rel=0.05)


def test_layer_gaussian_chosen_index_and_seeding(make_ctx, slices):
    ctx = make_ctx(seed=3)
    out = build_attack("layer_gaussian", {"layer": 0}).craft(ctx)
    changed = (out != ctx.own).nonzero().flatten()
    assert changed.numel() > 0 and bool((changed < slices[0].stop).all())
    last = build_attack("layer_gaussian", {"layer": -1}).craft(make_ctx(seed=3))
    assert torch.equal(last[: slices[2].start], ctx.own[: slices[2].start])
    assert torch.equal(out, build_attack("layer_gaussian", {"layer": 0}).craft(make_ctx(seed=3)))
    assert not torch.equal(out, build_attack("layer_gaussian", {"layer": 0}).craft(make_ctx(seed=4)))
    with pytest.raises(ValueError, match="layer=5"):
        build_attack("layer_gaussian", {"layer": 5}).craft(ctx)
