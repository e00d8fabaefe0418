"""Behaviour tests: each rule does what its paper says it is for, on a
constructed case where the naive alternative demonstrably fails."""
from __future__ import annotations

import torch

from orchestrator.defenses import RoundContext, build_defense
from proto.layout import Layout
from tests.unit.defenses.helpers import GLOBAL, LAYOUT, context, honest


def test_stpa_skips_a_round_whose_aggregate_opposes_the_momentum():
    rule = build_defense("stpa", {})
    state: dict = {}
    steps = []
    for r, sign in enumerate((1.0, 1.0, -0.5, 1.0)):
        x, mu = honest(10, LAYOUT.d, seed=r)
        x = x - mu + sign * GLOBAL.abs()  # same honest direction every round, reversed in round 3
        steps.append(rule(x, context(f=0, state=state)))
    assert [s.diagnostics["skipped"] for s in steps] == [False, False, True, False]
    assert torch.equal(steps[2].delta, torch.zeros(LAYOUT.d, dtype=torch.float64))
    assert steps[2].diagnostics["cosine"] < 0
    # Taken rounds step along the momentum, scaled by the cosine.
    v = state["v"]
    assert torch.allclose(steps[3].delta, v * steps[3].diagnostics["cosine"])


def test_stpa_keeps_the_larger_cluster_when_the_two_disagree():
    x, _ = honest(15, LAYOUT.d, seed=3)
    x[:5] = -x[:5]  # a minority pointing the other way: cross-cluster similarity < 0.02
    res = build_defense("stpa", {})(x, context(f=5))
    assert res.diagnostics["split"]
    assert res.accepted.tolist() == [False] * 5 + [True] * 10
    # First round: the step is the inner aggregate, the median of the kept rows.
    assert torch.allclose(res.delta, x[5:].quantile(0.5, dim=0))


def test_fedseca_elects_the_honest_sign_under_sign_flipping_at_40_percent():
    n, bad = 10, 4
    x, _ = honest(n, 2000, seed=4, spread=0.1)
    x[:bad] = -4.0 * x[bad:2 * bad]          # sign flipping, boosted, as scenarios/attack-signflip.toml
    honest_mean = x[bad:].mean(0)
    layout = Layout.from_shapes([("w", (2000,))])
    ctx = RoundContext(layout=layout, global_weights=torch.zeros(2000, dtype=x.dtype), f=bad)
    res = build_defense("fedseca", {})(x, ctx)
    # The flippers' concordance ratio is 0, so the election is exactly the honest clients' vote.
    vote = torch.sign(x[bad:]).sum(0)
    decided = vote != 0
    assert torch.equal(res.diagnostics["elected_sign"][decided].double(), torch.sign(vote[decided]))
    clear = honest_mean.abs() > 0.1           # coordinates with a definite honest sign
    assert torch.equal(res.diagnostics["elected_sign"][clear].double(), torch.sign(honest_mean[clear]))
    assert res.diagnostics["concordance"][:bad].eq(0).all()   # flippers get no vote
    assert torch.cosine_similarity(res.delta, honest_mean, dim=0) > 0.6
    mean = build_defense("mean", {})(x, ctx).delta
    assert torch.cosine_similarity(mean, honest_mean, dim=0) < 0   # the attack works on the mean


def test_fedseca_is_odd_and_homogeneous_so_deltas_and_gradients_agree():
    x, _ = honest(9, LAYOUT.d, seed=5, spread=0.2)
    rule = build_defense("fedseca", {})
    out = rule(x, context(f=0)).delta
    assert torch.allclose(rule(-x, context(f=0)).delta, -out, rtol=1e-12, atol=1e-15)
    assert torch.allclose(rule(2.5 * x, context(f=0)).delta, 2.5 * out, rtol=1e-12, atol=1e-15)


def _plugin_round(byzantine: torch.Tensor, params: dict | None = None):
    n, f = 12, byzantine.shape[0]
    g = torch.Generator().manual_seed(6)
    direction = 0.05 * torch.randn(LAYOUT.d, generator=g, dtype=torch.float64)
    x = direction + 0.01 * torch.randn(n, LAYOUT.d, generator=g, dtype=torch.float64)
    x[:f] = byzantine
    return build_defense("vdc", params or {})(x, context(f=f))


def test_plugin_rejects_gaussian_noise_models_and_keeps_honest_ones():
    # Untargeted model poisoning of the paper (Eq. 11-12): w_m = tau (w' - w_g), w' ~ N(0, I).
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(4, LAYOUT.d, generator=g, dtype=torch.float64) - GLOBAL
    for params in ({}, {"model": "delta"}, {"probes": 8, "inner": "median"}):
        res = _plugin_round(noise, params)
        assert res.accepted.tolist() == [False] * 4 + [True] * 8, params
        assert res.diagnostics["scores"][:4].max() < res.diagnostics["scores"][4:].min()


def test_plugin_drops_models_with_non_finite_features_first():
    bad = torch.zeros(2, LAYOUT.d, dtype=torch.float64)
    for layer in LAYOUT:
        if layer.name == "bn.running_var":
            bad[:, layer.slice] = -10.0   # negative variance: NaN features
    res = _plugin_round(bad)
    assert res.diagnostics["scores"][:2].eq(float("-inf")).all()
    assert res.accepted.tolist() == [False] * 2 + [True] * 10
    assert torch.isfinite(res.delta).all()


def test_cosine_krum_picks_honest_where_euclidean_krum_is_fooled_by_one_huge_layer():
    # A 20000-parameter layer dwarfs a 10-parameter one. Honest clients agree on
    # the direction of both layers but not on magnitude: half move 2x, half 8x
    # (say, different amounts of local data). Four colluders send one update at
    # 5x in the huge layer, between the two honest groups, with the small layer
    # flipped. Euclidean distance is all about the huge layer's magnitudes: the
    # colluders sit closer to every honest client than the two honest groups sit
    # to each other, and Krum picks a colluder. Cosine distance ignores the
    # magnitudes and sees the flipped layer.
    big, small, n, f = 20000, 10, 16, 4
    layout = Layout.from_shapes([("big", (big,)), ("small", (small,))])
    g = torch.Generator().manual_seed(8)
    u = torch.randn(big, generator=g, dtype=torch.float64)
    v = torch.randn(small, generator=g, dtype=torch.float64)
    u, v = u / u.norm(), 0.05 * v / v.norm()
    direction = torch.cat([u, v])
    scales = torch.tensor([2.0] * 6 + [8.0] * 6, dtype=torch.float64) + 0.1 * torch.rand(12, generator=g,
                                                                                         dtype=torch.float64)
    noise = 1e-3 / (big + small) ** 0.5 * torch.randn(n - f, big + small, generator=g, dtype=torch.float64)
    x = torch.empty(n, big + small, dtype=torch.float64)
    x[f:] = scales[:, None] * (direction + noise)
    x[:f] = torch.cat([5.0 * u, -5.0 * v])
    ctx = lambda: RoundContext(layout=layout, global_weights=torch.zeros(big + small, dtype=x.dtype), f=f)  # noqa: E731

    euclid = build_defense("krum", {})(x, ctx())
    assert euclid.accepted[:f].any()                          # fooled
    assert float(euclid.delta[big:] @ v) < 0                  # and the small layer is flipped
    for params in ({"distance": "cosine"}, {"distance": "cosine", "clip": "median"}):
        res = build_defense("krum", params)(x, ctx())
        assert not res.accepted[:f].any(), params
        assert float(res.delta[big:] @ v) > 0, params
    # Layerwise cosine may take a colluder's huge-layer slice (it is honest
    # there), never its small layer.
    lw = build_defense("krum", {"layerwise": True, "distance": "cosine", "clip": "median"})(x, ctx())
    assert not lw.diagnostics["layer_accepted"][1, :f].any()
    assert float(lw.delta[big:] @ v) > 0


def test_layerwise_krum_ignores_a_layer_that_dominates_the_norm():
    # Same effect from the layerwise side: a client that matches the honest
    # majority in the huge layer but not in the small one is selected globally,
    # never for the small layer when the rule runs per layer.
    big, small, n, f = 5000, 8, 11, 2
    layout = Layout.from_shapes([("big", (big,)), ("small", (small,))])
    g = torch.Generator().manual_seed(9)
    x = 0.01 * torch.randn(n, big + small, generator=g, dtype=torch.float64)
    x[f:, :big] += 1.0 * torch.randn(n - f, big, generator=g, dtype=torch.float64)   # heterogeneous big layer
    x[f:, big:] += 1.0
    x[:f, big:] -= 1.0                                                                # colluders flip the small layer
    ctx = lambda: RoundContext(layout=layout, global_weights=torch.zeros(big + small, dtype=x.dtype), f=f)  # noqa: E731
    glob = build_defense("krum", {})(x, ctx())
    lw = build_defense("krum", {"layerwise": True})(x, ctx())
    assert glob.accepted[:f].any()
    assert not lw.diagnostics["layer_accepted"][1, :f].any()
    assert (lw.delta[big:] > 0).all()


def test_bulyan_one_shot_and_iterative_selection_can_differ():
    # Iterative Krum re-scores on the shrinking pool; one-shot ranks once. The
    # two agree on easy data and must both exclude blatant outliers.
    x, _ = honest(15, LAYOUT.d, seed=10, spread=0.3)
    x[:3] = x[:3] * 50
    it = build_defense("bulyan", {})(x, context(f=3))
    one = build_defense("bulyan", {"selection": "one-shot"})(x, context(f=3))
    assert not it.accepted[:3].any() and not one.accepted[:3].any()
    assert int(it.accepted.sum()) == int(one.accepted.sum()) == 15 - 6


def test_bucketing_uses_the_round_generator_only():
    x, _ = honest(12, LAYOUT.d, seed=11)
    rule = build_defense("bucketing", {"inner": "krum"})
    torch.manual_seed(0)
    a = rule(x, context(f=1, seed=5)).delta
    torch.manual_seed(1)                      # the global RNG must not matter
    b = rule(x, context(f=1, seed=5)).delta
    c = rule(x, context(f=1, seed=6)).delta
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
