"""AttackContext validation, reference_stats and requirement errors."""
from __future__ import annotations

import pytest
import torch

from attacks import AttackContext, build_attack, mean_std, reference_stats


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_reference_stats_prefers_honest_then_colluders_then_own(make_ctx, honest):
    assert reference_stats(make_ctx()) is honest
    ctx = make_ctx(honest=None)
    assert torch.equal(reference_stats(ctx), honest[:3])
    ctx = make_ctx(honest=None, colluders=None)
    assert reference_stats(ctx).shape == (1, honest.shape[1])
    assert torch.equal(reference_stats(ctx)[0], honest[0])
    with pytest.raises(ValueError, match="no benign update"):
        reference_stats(make_ctx(honest=None, colluders=None, own=None))


def test_mean_std_single_row_has_zero_std():
    mu, sigma = mean_std(torch.ones(1, 5))
    assert torch.equal(mu, torch.ones(5)) and torch.equal(sigma, torch.zeros(5))


@pytest.mark.parametrize("overrides, word", [
    (dict(n=0), "n="),
    (dict(f=11), "f="),
    (dict(own=torch.zeros(2, 40)), "own"),
    (dict(colluders=torch.zeros(40)), "colluders"),
    (dict(honest=torch.zeros(0, 40)), "honest"),
    (dict(global_weights=torch.zeros(39)), "inconsistent d"),
    (dict(slices=[slice(30, 50)]), "slices"),
])
def test_context_validation(make_ctx, overrides, word):
    with pytest.raises(ValueError, match=word):
        make_ctx(**overrides)


def test_context_dim_needs_some_tensor():
    ctx = AttackContext(n=3, f=1, generator=gen())
    with pytest.raises(ValueError, match="model size d"):
        _ = ctx.dim


@pytest.mark.parametrize("name, overrides, missing", [
    ("alie", dict(colluders=None, honest=None), "ctx.colluders"),
    ("ipm", dict(colluders=None, honest=None), "ctx.colluders"),
    ("min_max", dict(colluders=None, honest=None), "ctx.colluders"),
    ("mimic", dict(honest=None), "ctx.honest"),
    ("sign_flip", dict(own=None), "ctx.own"),
    ("boost", dict(own=None), "ctx.own"),
    ("alie_opt", dict(aggregate=None), "ctx.aggregate"),
    ("untargeted", dict(global_weights=None), "ctx.global_weights"),
    ("layer_gaussian", dict(slices=None), "ctx.slices"),
])
def test_unmet_requirements_name_what_is_missing(make_ctx, name, overrides, missing):
    attack = build_attack(name, {})
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")) as info:
        attack.craft(make_ctx(**overrides))
    assert name in str(info.value)


def test_colluders_need_is_met_by_colluders_alone(make_ctx):
    out = build_attack("alie", {}).craft(make_ctx(honest=None))
    assert out.shape == (40,)
