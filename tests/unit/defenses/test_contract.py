"""Contract tests over the whole registry and every option combination.

Properties: permutation invariance (ties excluded by random data; bucketing is
randomised and checked separately), identical inputs returned unchanged,
bounded output next to the honest mean when f rows are huge outliers,
layerwise == global on a one-layer layout, clear errors for unmet requirements
and bad parameters, and the describe() listing.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from orchestrator.defenses import REGISTRY, DefenseError, build_defense, config_fields, describe
from tests.unit.defenses.helpers import LAYOUT, ONE_LAYER, context, honest, with_outliers


def _distance_configs() -> list[tuple[str, dict]]:
    out = []
    for name in ("krum", "multikrum", "geomed", "bulyan"):
        extra = [{}]
        if name == "multikrum":
            extra = [{}, {"m": 3}]
        if name == "bulyan":
            extra = [{"selection": s, "reduction": r} for s in ("iterative", "one-shot")
                     for r in ("closest-to-median", "trimmed-mean")]
        for lw, dist, clip, ex in itertools.product((False, True), ("euclidean", "cosine"),
                                                    (None, "median", "median-output"), extra):
            out.append((name, {"layerwise": lw, "distance": dist, "clip": clip, **ex}))
    return out


CONFIGS: list[tuple[str, dict]] = [
    ("mean", {}), ("fedavg", {}), ("median", {}), ("trimmed_mean", {}), ("trimmed_mean", {"beta": 0.2}),
    *_distance_configs(),
    ("rfa", {}), ("rfa", {"weighted": True}), ("rfa", {"layerwise": True, "clip": "median"}),
    ("rfa", {"clip": "median-output"}),
    ("centered_clipping", {}), ("centered_clipping", {"iters": 3, "start": "zero"}),
    ("norm_clipping", {}), ("norm_clipping", {"inner": "krum"}),
    ("nnm", {}), ("nnm", {"inner": {"name": "krum", "distance": "cosine", "clip": "median"}}),
    ("bucketing", {}), ("bucketing", {"s": 2, "inner": "trimmed_mean"}),
    ("layerwise", {}), ("layerwise", {"inner": "rfa"}),
    ("vdc", {}), ("vdc", {"model": "delta", "inner": "median"}), ("vdc", {"m": 2, "inner": {"name": "multikrum"}}),
    ("fedseca", {}), ("fedseca", {"gamma": 0.0, "momentum": True}), ("fedseca", {"gamma": 0.5}),
    ("stpa", {}), ("stpa", {"inner": "krum", "s_t": 0.5}),
]
NON_ROBUST = {"mean", "fedavg"}
RANDOMISED = {"bucketing"}
SELECTORS = {"krum", "multikrum", "geomed", "bulyan", "vdc"}
N, F = 15, 3


def _id(cfg: tuple[str, dict]) -> str:
    name, params = cfg
    return name + "".join(f"-{k}={v}" for k, v in params.items() if v not in (None, False))


def _run(name: str, params: dict, x: torch.Tensor, layout=LAYOUT, f: int = F, state=None, perm=None):
    """Run a fresh rule; ``perm`` says ``x`` is the rows permuted so (sample counts follow)."""
    ctx = context(f=f, layout=layout, state=state, dtype=x.dtype, n=x.shape[0])
    if perm is not None:
        ctx.sample_counts = ctx.sample_counts[perm]
    return build_defense(name, params)(x, ctx)


def test_every_registered_defense_is_covered():
    assert {name for name, _ in CONFIGS} == set(REGISTRY)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] not in RANDOMISED], ids=_id)
def test_permutation_invariance(cfg):
    name, params = cfg
    x, _ = honest(N, LAYOUT.d)
    x = with_outliers(x, 2, norm=10.0)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    a = _run(name, params, x)
    b = _run(name, params, x[perm], perm=perm)
    assert torch.allclose(a.delta, b.delta, rtol=1e-9, atol=1e-12)
    assert torch.equal(a.accepted[perm], b.accepted)


def test_bucketing_is_the_mean_under_any_permutation_when_inner_is_mean():
    x, _ = honest(14, LAYOUT.d)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(3))
    for seed in (1, 2):
        rule = build_defense("bucketing", {"inner": "mean"})
        out = rule(x[perm], context(seed=seed)).delta
        assert torch.allclose(out, x.mean(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_identical_inputs_returned_unchanged(cfg):
    name, params = cfg
    row, _ = honest(1, LAYOUT.d, seed=5)
    x = row.expand(N, -1).clone()
    res = _run(name, params, x)
    expected = row[0].clone()
    gamma = params.get("gamma", 0.9)
    if name == "fedseca" and gamma > 0:
        # Sparsification keeps only the coordinates above the gamma-quantile of |x|.
        k = int(gamma * (LAYOUT.d - 1)) + 1
        tau = torch.kthvalue(row[0].abs(), k).values
        expected[row[0].abs() <= tau] = 0
    assert torch.allclose(res.delta, expected, rtol=1e-9, atol=1e-14)
    assert res.accepted.dtype == torch.bool and res.accepted.shape == (N,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] not in NON_ROBUST], ids=_id)
def test_huge_outliers_stay_out(cfg, dtype):
    name, params = cfg
    good, _ = honest(N, LAYOUT.d, dtype=dtype)
    x = with_outliers(good, F, norm=1e6)
    mu = good[F:].mean(0)
    radius = float((good[F:] - mu).norm(dim=1).max())
    res = _run(name, params, x)
    err = float((res.delta - mu).norm())
    # FedSECA keeps 1 - gamma of the coordinates: near the honest mean only up to what it zeroes.
    bound = radius + (float(mu.norm()) if name == "fedseca" else 0.0)
    assert torch.isfinite(res.delta).all()
    if not (params.get("distance") == "cosine" and params.get("clip") is None):
        # Unclipped cosine ignores magnitude (documented; the paper pairs it with
        # median clipping): a huge update whose direction in a 3-value layer looks
        # honest may be averaged in. Its selection is still checked below.
        assert err <= bound, f"{err} > {bound}"
    if name in SELECTORS and not params.get("layerwise"):
        assert not res.accepted[:F].any()
    if name in SELECTORS and params.get("layerwise"):
        # In a 3-value bias a clipped random direction can pass for honest; in the
        # largest layer it cannot.
        largest = max(range(len(LAYOUT)), key=lambda i: LAYOUT.layers[i].numel)
        assert not res.diagnostics["layer_accepted"][largest, :F].any()


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1].get("layerwise")], ids=_id)
def test_layerwise_option_equals_global_on_one_layer(cfg):
    name, params = cfg
    x, _ = honest(N, ONE_LAYER.d, seed=2)
    a = _run(name, params, x, layout=ONE_LAYER)
    b = _run(name, {**params, "layerwise": False}, x, layout=ONE_LAYER)
    assert torch.equal(a.delta, b.delta)
    assert torch.equal(a.accepted, b.accepted)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] != "vdc"], ids=_id)
def test_layerwise_wrapper_equals_rule_on_one_layer(cfg):
    name, params = cfg
    x, _ = honest(N, ONE_LAYER.d, seed=2)
    a = _run("layerwise", {"inner": {"name": name, **params}}, x, layout=ONE_LAYER)
    b = _run(name, params, x, layout=ONE_LAYER)
    assert torch.equal(a.delta, b.delta)
    assert torch.equal(a.accepted, b.accepted)


def test_layerwise_changes_the_answer_on_a_real_layout():
    # Guard against a layerwise path that silently runs globally.
    x, _ = honest(N, LAYOUT.d, seed=4, spread=0.5)
    a = _run("krum", {"layerwise": True}, x)
    b = _run("krum", {}, x)
    assert a.diagnostics["layers"] == len(LAYOUT)
    assert not torch.equal(a.delta, b.delta)


@pytest.mark.parametrize("name,params,n,f,message", [
    ("krum", {}, 8, 3, "n >= 2f + 3"),
    ("multikrum", {"layerwise": True}, 8, 3, "n >= 2f + 3"),
    ("bulyan", {}, 14, 3, "n >= 4f + 3"),
    ("bulyan", {"distance": "cosine"}, 10, 2, "n >= 4f + 3"),
    ("trimmed_mean", {}, 6, 3, "n > 2k"),
    ("nnm", {}, 6, 3, "n > 2f"),
    ("vdc", {}, 3, 3, "m < n"),
    ("multikrum", {"m": 20}, 9, 3, "m = 20"),
    ("nnm", {"inner": "krum"}, 7, 3, "n >= 2f + 3"),
])
def test_unmet_requirements_raise_clear_errors(name, params, n, f, message):
    x, _ = honest(n, LAYOUT.d)
    with pytest.raises(DefenseError, match=message.replace("+", r"\+")):
        _run(name, params, x, f=f)


@pytest.mark.parametrize("name,n,f", [("krum", 9, 3), ("bulyan", 15, 3), ("trimmed_mean", 7, 3), ("nnm", 7, 3)])
def test_requirements_are_tight(name, n, f):
    x, _ = honest(n, LAYOUT.d)
    assert torch.isfinite(_run(name, {}, x, f=f).delta).all()


@pytest.mark.parametrize("name,params,match", [
    ("krum", {"distance": "manhattan"}, "one of"),
    ("krum", {"m": 2}, "no parameter 'm'"),
    ("bulyan", {"selection": "greedy"}, "one of"),
    ("multikrum", {"m": 0}, ">= 1"),
    ("fedseca", {"gamma": 1.0}, r"\[0, 1\)"),
    ("krum", {"layerwise": "yes"}, "must be bool"),
    ("nnm", {"inner": {"name": "krum", "bogus": 1}}, "nnm.inner"),
    ("nnm", {"inner": {"distance": "cosine"}}, "name"),
    ("layerwise", {"inner": "nope"}, "unknown defense"),
    ("vdc", {"input_shape": [0]}, "positive"),
])
def test_bad_parameters_are_errors(name, params, match):
    with pytest.raises(DefenseError, match=match):
        build_defense(name, params)


def test_describe_lists_every_defense_and_parameter():
    text = describe()
    for name in REGISTRY:
        assert f"\n{name}\n" in "\n" + text
        for pname, ptype, default in config_fields(name):
            assert f"{pname}: {ptype} = {default!r}" in text


def test_state_is_checkpoint_safe(tmp_path):
    # The orchestrator saves ctx.state with torch.save and loads it weights_only.
    x, _ = honest(N, LAYOUT.d)
    for name, params in [("stpa", {}), ("fedseca", {"momentum": True}), ("centered_clipping", {}),
                         ("layerwise", {"inner": "stpa"}), ("nnm", {"inner": "stpa"})]:
        state: dict = {}
        _run(name, params, x, state=state)
        torch.save(state, tmp_path / "s.pt")
        loaded = torch.load(tmp_path / "s.pt", weights_only=True)
        again = _run(name, params, x, state=loaded)
        assert torch.allclose(again.delta, _run(name, params, x, state=state).delta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", [("median", {}), ("bulyan", {"layerwise": True, "distance": "cosine"}),
                                 ("fedseca", {}), ("stpa", {}), ("vdc", {}), ("rfa", {})], ids=_id)
def test_cuda_matches_cpu(cfg):
    name, params = cfg
    x, _ = honest(N, LAYOUT.d)
    cpu = _run(name, params, x)
    rule = build_defense(name, params)
    gpu = rule(x.cuda(), context(f=F, dtype=x.dtype, n=N, device="cuda"))
    assert gpu.delta.is_cuda
    assert torch.allclose(gpu.delta.cpu(), cpu.delta, rtol=1e-6, atol=1e-9)


def test_fedavg_takes_no_weighted_switch():
    """FedAvg is the weighted mean: a `weighted = false` that it would ignore is refused, naming the key."""
    from orchestrator.defenses import DefenseError, build_defense, config_fields
    assert config_fields("fedavg") == []
    with pytest.raises(DefenseError, match="no parameter 'weighted'"):
        build_defense("fedavg", {"weighted": False})
    rule = build_defense("fedavg", {})
    from orchestrator.defenses import RoundContext
    from proto.layout import Layout
    x = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    ctx = RoundContext(layout=Layout.from_shapes([("w", (2,))]), global_weights=torch.zeros(2),
                       sample_counts=torch.tensor([1.0, 2.0]))
    assert torch.allclose(rule(x, ctx).delta, torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_two_runs_give_the_same_bits(cfg):
    """Reproducible runs: the same rows, seeds and state give the same aggregate and the
    same carried state, bit for bit, over three rounds (float32, as the orchestrator
    aggregates), from fresh rule instances."""
    name, params = cfg

    def three_rounds():
        rule, state, outs = build_defense(name, params), {}, []
        for r in range(3):
            x, _ = honest(N, LAYOUT.d, seed=r, dtype=torch.float32)
            x = with_outliers(x, 2, norm=10.0, seed=r)
            ctx = context(f=F, state=state, dtype=torch.float32, n=N, seed=r)
            res = rule(x, ctx)
            outs.append((res.delta.clone(), res.accepted.clone()))
        return outs, state

    (a, sa), (b, sb) = three_rounds(), three_rounds()
    for (da, aa), (db, ab) in zip(a, b):
        assert torch.equal(da, db) and torch.equal(aa, ab)
    assert sa.keys() == sb.keys()
    for k in sa:
        va, vb = sa[k], sb[k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k
