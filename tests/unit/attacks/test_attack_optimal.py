"""alie_opt / ipm_opt and the shared scale search."""
from __future__ import annotations

import pytest
import torch

from attacks import build_attack, search_scale


def median(rows: torch.Tensor) -> torch.Tensor:
    return rows.median(dim=0).values


def deviation(rows: torch.Tensor, crafted: torch.Tensor, f: int, rule) -> float:
    agg = rule(torch.cat([rows, crafted.expand(f, -1)]))
    return float((agg - rows.mean(0)).norm())


def test_search_scale_finds_a_smooth_maximum_in_few_evaluations():
    calls = []

    def objective(s):
        calls.append(s)
        return -(s - 3.21) ** 2

    s, v = search_scale(objective, 0.0, 10.0)
    assert s == pytest.approx(3.21, abs=0.01) and v <= 0
    assert len(calls) <= 30


def test_search_scale_keeps_extra_candidates_and_skips_nonfinite():
    s, v = search_scale(lambda s: 5.0 if s == 0.123 else (float("nan") if s > 5 else 0.0), 0.0, 10.0,
                        extra=(0.123,))
    assert s == 0.123 and v == 5.0


def test_alie_opt_beats_plain_alie_under_median(make_ctx, honest):
    f = 3
    ctx = make_ctx(f=f, aggregate=median)
    opt = build_attack("alie_opt", {}).craft(ctx)
    plain = build_attack("alie", {}).craft(make_ctx(f=f))
    assert deviation(honest, opt, f, median) >= deviation(honest, plain, f, median) - 1e-6
    assert opt.shape == (honest.shape[1],) and opt.dtype == torch.float32


def test_alie_opt_under_mean_goes_to_the_top_of_the_range(make_ctx):
    attack = build_attack("alie_opt", {"z_max": 4.0})
    attack.craft(make_ctx())  # mean rule: deviation grows with z
    assert attack.last_scale == pytest.approx(4.0)


def test_ipm_opt_minimises_inner_product(make_ctx, honest):
    f = 3
    mu = honest.mean(0)
    out = build_attack("ipm_opt", {}).craft(make_ctx(f=f, aggregate=median))
    agg = median(torch.cat([honest, out.expand(f, -1)]))
    plain = build_attack("ipm", {}).craft(make_ctx(f=f))
    agg_plain = median(torch.cat([honest, plain.expand(f, -1)]))
    assert float(agg @ mu) <= float(agg_plain @ mu) + 1e-6
    assert float(out @ mu) < 0


def test_rule_aware_attacks_call_the_rule_on_reference_plus_copies(make_ctx, honest):
    shapes = []

    def spy(rows):
        shapes.append(tuple(rows.shape))
        return rows.mean(0)

    # 3 colluder rows, completed to n - f = 8 honest rows (simulated_honest), plus f = 2 copies
    attack = build_attack("ipm_opt", {"grid": 5, "refine": 3})
    attack.craft(make_ctx(f=2, honest=None, aggregate=spy))
    assert set(shapes) == {(10, honest.shape[1])} and attack.last_filled == 5
    assert len(shapes) == 5 + 3 + 2


def test_search_config_validation():
    with pytest.raises(ValueError, match="z_max"):
        build_attack("alie_opt", {"z_min": 2.0, "z_max": 1.0})
    with pytest.raises(ValueError, match="grid"):
        build_attack("ipm_opt", {"grid": 1})
