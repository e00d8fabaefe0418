"""Nothing a client sends can stall or poison the federation.

Over the whole registry (every configuration of ``test_contract.CONFIGS``):

* one update holding an extreme finite value (1e12, 1e19, 3e38 in one entry, a
  whole row of 3e38, a row of +-float32 max) gives a finite aggregate that does
  not follow it;
* one update holding NaN or Inf gives a finite aggregate without it, or a
  ``DefenseError`` that says why, never NaN and never a foreign exception;
* float32 updates sharing a large common part (spread / common = 1e-3): the
  Euclidean distance rules pick what exact float64 arithmetic picks;
* ``min_clients(name, params, f)``: the fewest updates each rule can run with.

The extreme-value and NaN cases run on two layouts: the test model's (130 values,
where float32 Gram products are taken in float64) and a long one whose layers
take the float32 paths of ``_geometry.frame`` (centred blocks, scaled blocks).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from orchestrator.defenses import REGISTRY, DefenseError, build_defense, min_clients
from orchestrator.defenses._geometry import SMALL_D, frame, row_norms
from proto.layout import Layout
from tests.unit.defenses.helpers import LAYOUT, context
from tests.unit.defenses.test_contract import CONFIGS, NON_ROBUST, _id

N, F = 15, 3
F32_MAX = float(torch.finfo(torch.float32).max)
# Layers longer than SMALL_D: float32 products, centred and scaled block paths.
LONG = Layout.from_shapes([("a", (SMALL_D + 3000,)), ("b", (SMALL_D + 500,)), ("bias", (40,))])
LAYOUTS = {"model": LAYOUT, "long": LONG}
NEEDS_MODEL = {"vdc"}  # runs the test model: only on its layout
# Coordinate-wise rules report every client accepted (they discard values, not
# clients): an Inf is one more extreme value they trim (layerwise: its inner median).
VALUE_DISCARDING = {"median", "trimmed_mean", "layerwise"}


def _magnitude_blind(params: dict) -> bool:
    """Unclipped cosine ignores magnitude (documented, the paper always clips): a
    huge update may be picked when the honest directions are random."""
    return params.get("distance") == "cosine" and params.get("clip") is None


def _honest(layout: Layout, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(N, layout.d, generator=g, dtype=torch.float64)).to(dtype)  # N(0, 1e-2)


def _run(name: str, params: dict, x: torch.Tensor, layout: Layout, f: int = F):
    ctx = context(f=f, layout=layout, dtype=x.dtype, n=x.shape[0])
    return build_defense(name, params)(x, ctx)


def _run_or_blame_the_data(name, params, x, good, layout):
    """The result on ``x``; None when ``x`` raises a DefenseError that the honest
    rows ``good`` raise as well (then it is not the bad row's doing)."""
    try:
        return _run(name, params, x, layout)
    except DefenseError:
        with pytest.raises(DefenseError):
            _run(name, params, good, layout)
        return None


def _cases(kinds):
    out = []
    for cfg, lname, kind in itertools.product(CONFIGS, LAYOUTS, kinds):
        if cfg[0] in NEEDS_MODEL and lname != "model":
            continue
        out.append(pytest.param(cfg, lname, kind, id=f"{_id(cfg)}-{lname}-{kind}"))
    return out


# ------------------------------------------------------------ 1. extreme finite values

EXTREMES = ["entry1e12", "entry1e19", "entry3e38", "row3e38", "row+-max"]


def _extreme(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.clone()
    if kind.startswith("entry"):
        x[0, 5] = float(kind[len("entry"):])
    elif kind == "row3e38":
        x[0] = 3e38
    else:
        sign = torch.ones(x.shape[1], dtype=x.dtype)
        sign[1::2] = -1
        x[0] = sign * F32_MAX
    return x


@pytest.mark.parametrize("cfg,lname,kind", _cases(EXTREMES))
def test_one_extreme_finite_update_neither_stalls_nor_moves_the_aggregate(cfg, lname, kind):
    name, params = cfg
    layout = LAYOUTS[lname]
    good = _honest(layout, torch.float32)
    x = _extreme(good, kind)  # the extreme update comes first
    res = _run_or_blame_the_data(name, params, x, good, layout)
    if res is None:
        return
    assert torch.isfinite(res.delta).all(), "non-finite aggregate"
    if name in NON_ROBUST or _magnitude_blind(params):
        # The mean follows any single row (no Byzantine tolerance); it is only
        # required not to turn a finite sum into NaN. See _magnitude_blind.
        return
    mu = good[1:].double().mean(0)
    spread = float((good[1:].double() - mu).norm(dim=1).max())
    err = float((res.delta.double() - mu).norm())
    assert err < 10 * spread, f"{err:.3g} >= 10 x {spread:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("value", [1e12, 1e19, 3e38])
def test_rfa_does_not_stop_early_when_one_distance_dominates(value, dtype):
    # The objective's relative change stopped the iterations with the iterate
    # 2.6e3 (1e12) / 2.6e10 (1e19) away: now it converges like without the outlier.
    # The geometric median feels a far point only through its direction (one
    # unit vector in the optimality condition): 1e4 (far against the honest
    # distances, ~19) and 3e38 along the same axis give the same median.
    good = _honest(LONG, dtype)
    x, far = good.clone(), good.clone()
    x[0, 5], far[0, 5] = value, 1e4
    got = _run("rfa", {}, x, LONG)
    ref = _run("rfa", {}, far, LONG).delta.double()
    spread = float((good[1:].double() - good[1:].double().mean(0)).norm(dim=1).max())
    assert float((got.delta.double() - ref).norm()) < 1e-3 * spread
    assert got.diagnostics["iterations"] < 100


def test_geomed_does_not_pick_a_huge_update_that_comes_first():
    good = _honest(LONG, torch.float32)
    x = good.clone()
    x[0, 5] = 3e38
    res = _run("geomed", {}, x, LONG)
    assert not res.accepted[0]
    assert float(res.delta.abs().max()) < 1.0


@pytest.mark.parametrize("d", [200, SMALL_D + 1000])
def test_frame_of_huge_rows_is_exact_and_finite(d):
    g = torch.Generator().manual_seed(3)
    x = (0.1 * torch.randn(6, d, generator=g)).float()
    x[0, 7] = 3e38
    x[1] = F32_MAX
    x[2, :3] = torch.tensor([1e19, -2e20, 5e25])
    for centre in (True, False):
        fr = frame(x, centre=centre, origin=True)
        assert fr.all_finite and torch.isfinite(fr.g).all()
        x64 = x.double()
        exact = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
        from orchestrator.defenses._geometry import Geometry
        got = Geometry(fr).sq_euclidean()
        assert torch.allclose(got, exact, rtol=1e-5, atol=1e-6)
        assert torch.allclose(fr.sq_norms(), (x64 ** 2).sum(1), rtol=1e-5)


def test_row_norms_do_not_overflow_or_underflow():
    x = torch.zeros(4, 1000)
    x[0] = F32_MAX
    x[1, 3] = 1e-30
    x[2, 0] = float("nan")
    norms, finite = row_norms(x)
    assert finite.tolist() == [True, True, False, True]
    assert norms[0] == pytest.approx(F32_MAX * 1000 ** 0.5, rel=1e-6)
    assert norms[1] == pytest.approx(1e-30, rel=1e-6)
    assert norms[3] == 0


# ----------------------------------------------------------------- 2. NaN and Inf

NONFINITE = ["nan-entry", "inf-entry", "neg-inf-entry", "nan-row"]


def _nonfinite(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.clone()
    if kind == "nan-row":
        x[0] = float("nan")
    else:
        x[0, 5] = {"nan-entry": float("nan"), "inf-entry": float("inf"), "neg-inf-entry": float("-inf")}[kind]
    return x


@pytest.mark.parametrize("cfg,lname,kind", _cases(NONFINITE))
def test_an_update_holding_nan_or_inf_is_left_out_or_refused(cfg, lname, kind):
    name, params = cfg
    layout = LAYOUTS[lname]
    good = _honest(layout, torch.float32)
    x = _nonfinite(good, kind)
    try:
        res = _run(name, params, x, layout)
    except DefenseError as exc:
        if name in NON_ROBUST:
            assert any(w in str(exc) for w in ("NaN", "Inf", "not finite")), str(exc)
            return
        # A robust rule may only refuse what it refuses on the honest rows alone.
        assert _run_or_blame_the_data(name, params, x, good, layout) is None, str(exc)
        return
    assert torch.isfinite(res.delta).all(), "non-finite aggregate"
    if name not in VALUE_DISCARDING:
        if "layer_accepted" in res.diagnostics:
            # Layerwise: the layers the bad values sit in leave the row out; the
            # others may accept it (a client is accepted when some layer is).
            hit = [i for i, layer in enumerate(layout) if kind == "nan-row" or layer.offset <= 5 < layer.offset + layer.numel]
            assert not res.diagnostics["layer_accepted"][hit, 0].any()
        else:
            assert not res.accepted[0]
    if res.weights is not None:
        assert torch.isfinite(res.weights).all()
        if "layer_accepted" not in res.diagnostics:  # layerwise weights average the layers'
            assert float(res.weights[0]) == 0.0
    if not _magnitude_blind(params):
        mu = good[1:].double().mean(0)
        spread = float((good[1:].double() - mu).norm(dim=1).max())
        assert float((res.delta.double() - mu).norm()) < 10 * spread


@pytest.mark.parametrize("name,params", [("krum", {}), ("multikrum", {}), ("bulyan", {}), ("geomed", {}),
                                         ("rfa", {}), ("centered_clipping", {}), ("nnm", {})])
def test_rules_that_run_on_the_finite_rows_say_which_they_left_out(name, params):
    x = _nonfinite(_honest(LONG, torch.float32), "nan-entry")
    x[4, 0] = float("inf")
    res = _run(name, params, x, LONG)
    assert res.diagnostics["nonfinite"].tolist() == [0, 4]
    assert not res.accepted[[0, 4]].any()


def test_every_row_non_finite_is_a_clear_error():
    x = torch.full((N, LONG.d), float("nan"))
    for name in ("krum", "median", "rfa", "stpa", "mean"):
        with pytest.raises(DefenseError, match="NaN"):
            _run(name, {}, x, LONG)


def test_leaving_rows_out_keeps_the_requirement_when_they_are_byzantine():
    # n = 2f + 3 with b <= f rows holding NaN: n - b >= 2 (f - b) + 3 still holds.
    x = _honest(LONG, torch.float32)[:9]
    x[:2] = float("nan")
    res = _run("krum", {}, x, LONG, f=3)
    assert torch.isfinite(res.delta).all() and not res.accepted[:2].any()
    # More non-finite rows than Krum can do without: a clear error.
    x[:7] = float("nan")
    with pytest.raises(DefenseError, match=r"n >= 2f \+ 3.*NaN or Inf"):
        _run("krum", {}, x, LONG, f=3)


# -------------------------------------------------------- 3. float32 distances

EXACT_RULES = [("krum", {}), ("multikrum", {}), ("geomed", {}),
               ("bulyan", {"selection": "iterative"}), ("bulyan", {"selection": "one-shot"})]
ONE_LONG = Layout.from_shapes([("w", (SMALL_D + 4000,))])
TWO_LONG = Layout.from_shapes([("a", (SMALL_D + 4000,)), ("b", (SMALL_D + 1000,))])


def _late_training(layout: Layout, seed: int, n: int = N) -> torch.Tensor:
    """A common part of norm 1 plus per-client spread of norm ~1e-3 (float32)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(layout.d, generator=g, dtype=torch.float64)
    c = c / c.norm()
    spread = torch.randn(n, layout.d, generator=g, dtype=torch.float64) * (1e-3 / layout.d ** 0.5)
    return (c + spread).float()


def _exact_sq_dist(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances from explicit float64 differences (never a Gram matrix)."""
    y = x.double() if scale is None else x.double() * scale[:, None]
    return ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def _exact_clip_scale(x: torch.Tensor, clip) -> torch.Tensor | None:
    if clip != "median":
        return None
    norms = x.double().norm(dim=1)
    med = norms.sort().values[(len(norms) - 1) // 2: len(norms) // 2 + 1].mean()
    return torch.clamp(med / norms, max=1.0)


def _krum_scores(dist: torch.Tensor, pool: list[int], f: int) -> dict[int, float]:
    k = min(max(len(pool) - f - 2, 1), len(pool) - 1)
    return {i: sum(sorted(float(dist[i, j]) for j in pool if j != i)[:k]) for i in pool}


def _exact_pick(name: str, params: dict, x: torch.Tensor, f: int) -> list[int]:
    clip = params.get("clip")
    dist = _exact_sq_dist(x, _exact_clip_scale(x, clip))
    n = x.shape[0]
    if name == "geomed":
        return [int(dist.sqrt().sum(1).argmin())]
    scores = _krum_scores(dist, list(range(n)), f)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    if name == "krum":
        return [order[0]]
    if name == "multikrum":
        return sorted(order[:n - f])
    theta = n - 2 * f
    if params.get("selection") == "one-shot":
        return sorted(order[:theta])
    pool, picked = list(range(n)), []
    for _ in range(theta):
        s = _krum_scores(dist, pool, f)
        j = min(pool, key=lambda i: (s[i], i))
        picked.append(j)
        pool.remove(j)
    return sorted(picked)


@pytest.mark.parametrize("clip", [None, "median", "median-output"])
@pytest.mark.parametrize("name,params", EXACT_RULES, ids=lambda v: v if isinstance(v, str) else "")
def test_float32_picks_are_the_exact_picks_under_a_large_common_part(name, params, clip):
    wrong = []
    for seed in range(10):
        x = _late_training(ONE_LONG, seed)
        res = _run(name, {**params, "clip": clip}, x, ONE_LONG)
        if res.diagnostics["selected"].tolist() != _exact_pick(name, {**params, "clip": clip}, x, F):
            wrong.append(seed)
    assert not wrong, f"picks differ from exact arithmetic for seeds {wrong}"


@pytest.mark.parametrize("name,params", EXACT_RULES, ids=lambda v: v if isinstance(v, str) else "")
def test_float32_layerwise_picks_are_the_exact_picks_under_a_large_common_part(name, params):
    wrong = []
    for seed in range(10):
        x = _late_training(TWO_LONG, seed)
        res = _run(name, {**params, "layerwise": True}, x, TWO_LONG)
        for i, layer in enumerate(TWO_LONG):
            want = torch.zeros(N, dtype=torch.bool)
            want[_exact_pick(name, params, x[:, layer.slice], F)] = True
            if not torch.equal(res.diagnostics["layer_accepted"][i], want):
                wrong.append((seed, layer.name))
    assert not wrong, f"picks differ from exact arithmetic for {wrong}"


def test_float32_nnm_neighbours_are_the_exact_neighbours():
    for seed in range(10):
        x = _late_training(ONE_LONG, seed)
        res = _run("nnm", {}, x, ONE_LONG)
        dist = _exact_sq_dist(x)
        dist.fill_diagonal_(-1.0)
        near = torch.sort(dist, dim=1, stable=True).indices[:, :N - F]
        assert torch.equal(torch.sort(res.diagnostics["neighbours"], 1).values, torch.sort(near, 1).values)


@pytest.mark.parametrize("name", ["krum", "multikrum", "geomed"])
def test_float32_picks_stay_exact_with_a_far_byzantine_minority(name):
    # 6 of 15 updates far away: the centring decision and the reference row come
    # from robust medians, so the honest picks keep exact arithmetic's precision.
    for seed in range(5):
        x = _late_training(ONE_LONG, seed).double()
        g = torch.Generator().manual_seed(100 + seed)
        x[:6] += 0.5 * torch.randn(6, ONE_LONG.d, generator=g, dtype=torch.float64) / ONE_LONG.d ** 0.5
        x = x.float()
        res = _run(name, {}, x, ONE_LONG, f=6)
        assert res.diagnostics["selected"].tolist() == _exact_pick(name, {}, x, 6), seed


def test_a_reference_row_central_only_on_the_sample_is_caught():
    # The frame centres on the row the column sample finds most central. Make a
    # row sit on the common part exactly there and far away elsewhere: the
    # check on the full result recomputes with a better reference.
    from orchestrator.defenses._geometry import _sample_positions

    x = _late_training(ONE_LONG, 0).double()
    pos = _sample_positions(ONE_LONG.d)
    common = x[1:].mean(0)
    sly = common + 1.0  # far from every honest row ...
    sly[pos] = common[pos]  # ... except on the sampled columns, where it is the centre
    x[0] = sly
    x = x.float()
    res = _run("krum", {}, x, ONE_LONG)
    assert res.diagnostics["selected"].tolist() == _exact_pick("krum", {}, x, F)
    res = _run("multikrum", {}, x, ONE_LONG)
    assert res.diagnostics["selected"].tolist() == _exact_pick("multikrum", {}, x, F)


def test_distances_without_a_common_part_skip_centring_and_stay_exact():
    g = torch.Generator().manual_seed(5)
    x = (1e-3 * torch.randn(N, ONE_LONG.d, generator=g)).float()  # the benchmark's data
    fr = frame(x, centre=True)
    assert not fr.centred
    from orchestrator.defenses._geometry import Geometry
    assert torch.allclose(Geometry(fr).sq_euclidean(), _exact_sq_dist(x), rtol=1e-5)


def test_centred_frame_matches_exact_distances_norms_and_clipped_rows():
    from orchestrator.defenses._geometry import Geometry

    x = _late_training(ONE_LONG, 1)
    fr = frame(x, centre=True, origin=True)
    assert fr.centred
    exact = _exact_sq_dist(x)
    got = Geometry(fr).sq_euclidean()
    off = ~torch.eye(N, dtype=torch.bool)
    assert ((got - exact).abs()[off] / exact[off]).max() < 1e-4
    assert torch.allclose(fr.sq_norms(), (x.double() ** 2).sum(1), rtol=1e-6)
    s = _exact_clip_scale(x, "median")
    got = Geometry(fr, s).sq_euclidean()
    exact = _exact_sq_dist(x, s)
    assert ((got - exact).abs()[off] / exact[off]).max() < 1e-3


@pytest.mark.parametrize("n,origin,extra", [(14, False, 0), (15, False, 0), (16, False, 0), (16, True, 0),
                                             (29, False, 2), (32, False, 0), (31, True, 0), (20, False, 0)])
def test_centred_frame_exact_for_padded_row_counts(n, origin, extra):
    # n = 16, 32, ... rows centred on one of them leave 15, 31, ... for the products,
    # which run padded with zero rows to 16, 32, ...: the padding must not show.
    from orchestrator.defenses._geometry import Geometry, _padded_rows

    both = _late_training(ONE_LONG, 7, n=n + extra)  # extra points near the rows, as a rule's are
    x, ext = both[:n], (both[n:] if extra else None)
    fr = frame(x, centre=True, origin=origin, extra=ext)
    assert fr.centred and fr.g.shape == (n + extra + int(origin),) * 2
    pts = x if ext is None else torch.cat([x, ext])
    if origin:
        pts = torch.cat([pts, torch.zeros(1, ONE_LONG.d)])
    exact = _exact_sq_dist(pts)
    got = Geometry(fr).sq_euclidean() if not extra and not origin else None
    g = fr.g
    d = (g.diagonal()[:, None] + g.diagonal()[None, :] - 2 * g)
    m = pts.shape[0]
    off = ~torch.eye(m, dtype=torch.bool)
    assert ((d - exact).abs()[off] / exact[off]).max() < 1e-4
    if got is not None:
        assert ((got - exact).abs()[off] / exact[off]).max() < 1e-4
    assert _padded_rows(n + extra + int(origin) - 1) % 16 in (0, (n + extra + int(origin) - 1) % 16)


# ----------------------------------------------------------------- 4. min_clients

@pytest.mark.parametrize("name,params,f,expected", [
    ("mean", {}, 3, 1), ("fedavg", {}, 3, 1), ("median", {}, 3, 1), ("geomed", {}, 3, 1), ("rfa", {}, 3, 1),
    ("centered_clipping", {}, 3, 1), ("fedseca", {}, 3, 1),
    ("trimmed_mean", {}, 3, 7), ("trimmed_mean", {"beta": 0.2}, 3, 1),
    ("krum", {}, 0, 3), ("krum", {}, 3, 9), ("krum", {"layerwise": True, "distance": "cosine"}, 2, 7),
    ("multikrum", {}, 3, 9), ("multikrum", {"m": 12}, 3, 12),
    ("bulyan", {}, 0, 3), ("bulyan", {}, 3, 15),
    ("nnm", {}, 3, 7), ("nnm", {"inner": "krum"}, 3, 9), ("nnm", {"inner": "bulyan"}, 2, 11),
    ("norm_clipping", {}, 3, 1), ("norm_clipping", {"inner": "krum"}, 3, 9),
    ("bucketing", {}, 3, 1), ("bucketing", {"s": 2, "inner": "krum"}, 3, 17),
    ("bucketing", {"s": 3, "inner": "trimmed_mean"}, 2, 13),
    ("layerwise", {}, 3, 1), ("layerwise", {"inner": "bulyan"}, 2, 11),
    ("vdc", {}, 3, 4), ("vdc", {"m": 2, "inner": {"name": "multikrum"}}, 3, 11),
    ("stpa", {}, 3, 1), ("stpa", {"inner": "krum"}, 3, 9),
])
def test_min_clients(name, params, f, expected):
    assert min_clients(name, params, f) == expected


def test_min_clients_covers_every_registered_rule():
    for name in REGISTRY:
        assert min_clients(name, {}, 0) >= 1


def test_min_clients_errors():
    with pytest.raises(DefenseError, match="unknown defense"):
        min_clients("nope", {}, 1)
    with pytest.raises(DefenseError, match="no parameter"):
        min_clients("krum", {"bogus": 1}, 1)
    with pytest.raises(DefenseError, match="f must be >= 0"):
        min_clients("krum", {}, -1)


TIGHT = [("krum", {}), ("multikrum", {"m": 12}), ("bulyan", {}), ("trimmed_mean", {}), ("nnm", {"inner": "krum"}),
         ("norm_clipping", {"inner": "bulyan"}), ("bucketing", {"s": 2, "inner": "krum"}),
         ("layerwise", {"inner": "krum"}), ("vdc", {"inner": "trimmed_mean"})]


@pytest.mark.parametrize("f", [0, 1, 3])
@pytest.mark.parametrize("name,params", TIGHT, ids=lambda v: v if isinstance(v, str) else "")
def test_min_clients_is_tight(name, params, f):
    n = min_clients(name, params, f)
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(n, LAYOUT.d, generator=g, dtype=torch.float64)
    assert torch.isfinite(_run(name, params, x, LAYOUT, f=f).delta).all()
    if n > 1:
        with pytest.raises(DefenseError):
            _run(name, params, x[:n - 1], LAYOUT, f=f)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_every_configuration_runs_at_its_min_clients(cfg):
    name, params = cfg
    n = min_clients(name, params, F)
    x = _honest(LAYOUT, torch.float64)
    x = torch.cat([x] * (n // N + 1))[:n] if n > N else x[:n]
    if name == "stpa":
        x[: n // 2] *= -1  # two opposed clusters: it would split
    res = _run(name, params, x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                                    dtype=x.dtype), LAYOUT)
    assert torch.isfinite(res.delta).all()


def test_stpa_keeps_every_update_when_the_larger_cluster_is_too_small_for_its_inner_rule():
    x = _honest(LAYOUT, torch.float64)[:9]
    x[:4] = -x[:4] - 0.5   # two opposed clusters, 4 and 5
    x[4:] += 0.5
    res = _run("stpa", {"inner": "krum", "s_t": 0.5}, x, LAYOUT, f=3)  # krum needs 9
    assert not res.diagnostics["split"] and torch.isfinite(res.delta).all()
    res = _run("stpa", {"s_t": 0.5}, x, LAYOUT, f=3)  # the median can do with 5
    assert res.diagnostics["split"] and res.accepted.tolist() == [False] * 4 + [True] * 5


def test_a_non_finite_centre_from_the_last_round_is_dropped():
    state = {"center": torch.full((LONG.d,), float("nan"))}
    x = _honest(LONG, torch.float32)
    ctx = context(f=F, layout=LONG, dtype=x.dtype, n=N, state=state)
    res = build_defense("centered_clipping", {})(x, ctx)
    assert torch.isfinite(res.delta).all() and torch.isfinite(state["center"]).all()


def test_the_median_of_two_middle_values_near_the_float32_maximum_is_finite():
    x = torch.zeros(4, LONG.d)
    x[1:] = F32_MAX  # beyond the breakdown point, but finite in, finite out
    res = _run("median", {}, x, LONG, f=1)
    assert torch.isfinite(res.delta).all() and float(res.delta[0]) == F32_MAX
