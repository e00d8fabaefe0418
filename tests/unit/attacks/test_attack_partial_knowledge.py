"""Rule-aware attacks without the omniscient view (knowledge ``colluders``).

Before the fix, alie_opt / ipm_opt simulated the rule on ``[k colluder rows; f copies]``,
a matrix Krum, Bulyan and trimmed mean refuse for the round's f (the node then uploaded
nothing), and with one colluder fang_trmean sent its own benign row. These tests run the
real registered defense rules (``orchestrator.defenses.rule_for_attack``) on what the
attacks build.
"""
from __future__ import annotations

import pytest
import torch

from attacks import alie_default_z, build_attack, simulated_honest
from orchestrator.defenses import rule_for_attack
from proto.layout import Layout

D = 40
LAYOUT = Layout.from_shapes([("a", (10,)), ("b", (24,)), ("c", (6,))])  # the conftest's SLICES


def real_rule(name: str, f: int, calls: list | None = None):
    rule = rule_for_attack(name, {})

    def aggregate(rows: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(tuple(rows.shape))
        return rule(rows, f=f, generator=torch.Generator().manual_seed(0), layout=LAYOUT,
                    global_weights=torch.zeros(D), round=4)
    return aggregate


RULES = [("krum", 3), ("multikrum", 3), ("bulyan", 1), ("trimmed_mean", 3)]


@pytest.mark.parametrize("attack", ["alie_opt", "ipm_opt"])
@pytest.mark.parametrize("rule,rule_f", RULES)
@pytest.mark.parametrize("k", [1, 3])
def test_rule_aware_attacks_run_the_rule_on_a_full_size_matrix(make_ctx, honest, attack, rule, rule_f, k):
    calls: list = []
    colluders = honest[:k].clone()
    ctx = make_ctx(honest=None, colluders=colluders, aggregate=real_rule(rule, rule_f, calls))
    a = build_attack(attack, {"grid": 5, "refine": 3})
    out = a.craft(ctx)  # raised DefenseError ("needs n >= ...") before the fix
    assert a.last_fallback is None and a.last_filled == (7 if k == 1 else 7 - k)  # k = 1: all drawn
    assert set(calls) == {(10, D)}  # the real round's n rows: 7 honest (k known + filled) + 3 copies
    assert torch.isfinite(out).all()
    mu = colluders.mean(0)
    if attack == "ipm_opt":
        assert float(out @ mu) <= 0  # never along the known honest direction (0: zeros stall Krum)
        assert torch.allclose(out, -a.last_scale * mu)
    else:
        assert torch.allclose(out, mu + a.last_scale * simulated_honest(ctx).sigma, atol=1e-6)


def test_alie_opt_with_one_colluder_does_not_send_its_own_benign_row(make_ctx, honest):
    """One colluder: zero std, so before the fix every z gave back the benign row (z was moot)."""
    own = honest[0].clone()
    ctx = make_ctx(honest=None, colluders=own[None], aggregate=real_rule("trimmed_mean", 3))
    a = build_attack("alie_opt", {"grid": 5, "refine": 3})
    out = a.craft(ctx)
    sigma = simulated_honest(ctx).sigma
    assert bool((sigma > 0).all())
    # the per-layer spread of the single row (the conftest's three layers)
    for sl in (slice(0, 10), slice(10, 34), slice(34, 40)):
        assert torch.allclose(sigma[sl], own[sl].std().expand(sl.stop - sl.start))
    assert a.last_scale > 0 and float((out - own).norm()) > 0.1 * float(own.norm())


def test_the_fill_is_shared_by_colluders_and_leaves_known_rows_first(make_ctx, honest):
    cols = honest[:2].clone()
    a = simulated_honest(make_ctx(seed=1, honest=None, colluders=cols))
    b = simulated_honest(make_ctx(seed=2, honest=None, colluders=cols))  # another node's generator
    assert a.filled == 5 and a.rows.shape == (7, D)
    assert torch.equal(a.rows, b.rows)  # same known rows and round: the same fill, one crafted row
    assert torch.equal(a.rows[:2], cols)
    assert torch.allclose(a.mu, cols.mean(0)) and torch.allclose(a.sigma, cols.std(0))
    other_round = simulated_honest(make_ctx(seed=1, honest=None, colluders=cols, round=5))
    assert not torch.equal(a.rows[2:], other_round.rows[2:])


def test_omniscient_reference_is_not_filled(make_ctx, honest):
    sim = simulated_honest(make_ctx())
    assert sim.filled == 0 and torch.equal(sim.rows, honest)
    a = build_attack("alie_opt", {"grid": 5, "refine": 3})
    out = a.craft(make_ctx(aggregate=real_rule("krum", 3)))
    assert a.last_filled == 0
    assert torch.allclose(out, honest.mean(0) + a.last_scale * honest.std(0), atol=1e-6)


def test_a_rule_that_still_refuses_falls_back_to_the_plain_scale(make_ctx, honest):
    """Bulyan with f = 3 needs 15 rows; a round of 10 cannot give them: plain ALIE, not silence."""
    a = build_attack("alie_opt", {"grid": 5, "refine": 3})
    ctx = make_ctx(honest=None, aggregate=real_rule("bulyan", 3))
    out = a.craft(ctx)
    assert a.last_fallback is not None and "4f + 3" in a.last_fallback
    sim = simulated_honest(ctx)
    assert a.last_scale == pytest.approx(alie_default_z(10, 3))
    assert torch.allclose(out, sim.mu + alie_default_z(10, 3) * sim.sigma, atol=1e-6)


def test_a_wrong_shape_from_the_rule_is_still_an_error(make_ctx):
    with pytest.raises(RuntimeError, match="shape"):
        build_attack("ipm_opt", {"grid": 3, "refine": 1}).craft(
            make_ctx(honest=None, aggregate=lambda rows: rows.mean(0)[:-1]))


def test_fang_trmean_with_one_colluder_goes_past_its_own_row(make_ctx, honest):
    own = honest[0].clone()
    out = build_attack("fang_trmean", {}).craft(make_ctx(honest=None, colluders=own[None]))
    up = own >= 0
    # before the fix sigma was 0 and the attack sent `own` itself
    assert bool((out[up] < own[up]).all()) and bool((out[~up] > own[~up]).all())


def test_fang_krum_with_one_colluder_searches_lambda_on_a_full_size_matrix(make_ctx, honest):
    """[1 row; 3 copies] made Krum pick the copies at the first (largest) lambda; on the
    simulated 7 + 3 matrix the search halves lambda until the copies win there."""
    own = honest[0].clone()
    ctx = make_ctx(honest=None, colluders=own[None])
    a = build_attack("fang_krum", {})
    out = a.craft(ctx)
    assert a.last_filled == 7  # one known row is the centre of the draws, not one of the rows
    sim = simulated_honest(ctx)
    s = torch.sign(own)
    lam = float(-(out @ s) / s.abs().sum())
    assert lam > 0 and torch.allclose(out, -lam * s, atol=1e-6)
    rows = torch.cat([sim.rows, out.expand(3, -1)])
    picked = rule_for_attack("krum", {})(rows, f=3, generator=None, layout=LAYOUT, global_weights=torch.zeros(D))
    assert torch.allclose(picked, out, atol=1e-5)  # Krum over the simulated round selects the crafted row
