"""Each rule against a deliberately naive float64 implementation: explicit loops
over clients, pairs and coordinates, distances computed directly (never from a
Gram matrix), Python's ``sorted``/``statistics.median`` and numpy's quantile."""
from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from orchestrator.defenses import build_defense
from tests.unit.defenses.helpers import GLOBAL, LAYOUT, TinySeq, context, honest, model_fn, with_outliers

N, F = 15, 3


def data(seed: int = 0, n: int = N, outliers: int = 2) -> torch.Tensor:
    x, _ = honest(n, LAYOUT.d, seed=seed, spread=0.08)
    return with_outliers(x, outliers, norm=5.0, seed=seed + 11)


# ----------------------------------------------------------------- naive pieces

def vnorm(v) -> float:
    return math.sqrt(sum(float(t) ** 2 for t in v))


def dot(a, b) -> float:
    return sum(float(s) * float(t) for s, t in zip(a, b))


def cos(a, b) -> float:
    na, nb = vnorm(a), vnorm(b)
    return 0.0 if na == 0 or nb == 0 else dot(a, b) / (na * nb)


def dist(a, b, kind: str) -> float:
    """What Krum ranks by: squared Euclidean, or 1 - cos."""
    if kind == "euclidean":
        return sum((float(s) - float(t)) ** 2 for s, t in zip(a, b))
    return 1.0 - cos(a, b)


def clip_rows(rows, clip):
    """Rows used by the rule, and the radius for output clipping."""
    norms = [vnorm(r) for r in rows]
    med = statistics.median(norms)
    if clip == "median":
        rows = [r * min(1.0, med / nm) if nm > 0 else r for r, nm in zip(rows, norms)]
    return rows, med


def finish(out, clip, med):
    nm = vnorm(out)
    return out * (med / nm) if clip == "median-output" and nm > med else out


def per_layer(fn, x, layerwise):
    if not layerwise:
        return fn(x)
    return torch.cat([fn(x[:, layer.slice]) for layer in LAYOUT])


def krum_score(rows, i, pool, f, kind):
    others = sorted(dist(rows[i], rows[j], kind) for j in pool if j != i)
    k = min(max(len(pool) - f - 2, 1), len(pool) - 1)
    return sum(others[:k])


# ------------------------------------------------------------------ references

def ref_multikrum(x, f, m, kind, clip):
    rows, med = clip_rows(list(x), clip)
    n = len(rows)
    scores = [krum_score(rows, i, range(n), f, kind) for i in range(n)]
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[: (n - f if m is None else m)]
    return finish(sum(rows[i] for i in chosen) / len(chosen), clip, med)


def ref_geomed(x, kind, clip):
    rows, med = clip_rows(list(x), clip)
    n = len(rows)
    d = (lambda a, b: math.sqrt(dist(a, b, "euclidean"))) if kind == "euclidean" else (lambda a, b: dist(a, b, "cosine"))
    scores = [sum(d(rows[i], rows[j]) for j in range(n) if j != i) for i in range(n)]
    return finish(rows[min(range(n), key=lambda i: (scores[i], i))].clone(), clip, med)


def ref_bulyan(x, f, kind, clip, selection, reduction):
    rows, med = clip_rows(list(x), clip)
    n = len(rows)
    theta, beta = n - 2 * f, n - 4 * f
    if selection == "one-shot":
        scores = [krum_score(rows, i, range(n), f, kind) for i in range(n)]
        chosen = sorted(range(n), key=lambda i: (scores[i], i))[:theta]
    else:
        pool, chosen = list(range(n)), []
        for _ in range(theta):
            best = min(pool, key=lambda i: (krum_score(rows, i, pool, f, kind) if len(pool) > 1 else 0.0, i))
            chosen.append(best)
            pool.remove(best)
    out = torch.zeros(x.shape[1], dtype=x.dtype)
    for j in range(x.shape[1]):
        vals = sorted(float(rows[i][j]) for i in chosen)
        if reduction == "trimmed-mean":
            keep = vals[f:theta - f]
        else:
            m = statistics.median(vals)
            keep = [vals[t] for t in sorted(range(theta), key=lambda t: (abs(vals[t] - m), t))[:beta]]
        out[j] = sum(keep) / beta
    return finish(out, clip, med)


def ref_median(x):
    return torch.tensor([statistics.median(float(v) for v in x[:, j]) for j in range(x.shape[1])], dtype=x.dtype)


def ref_trimmed(x, k):
    out = []
    for j in range(x.shape[1]):
        vals = sorted(float(v) for v in x[:, j])
        out.append(sum(vals[k:len(vals) - k]) / (len(vals) - 2 * k))
    return torch.tensor(out, dtype=x.dtype)


def ref_rfa(x, weights=None, max_iter=100, nu=1e-6, tol=1e-6, clip=None):
    rows, med = clip_rows(list(x), clip)
    n = len(rows)
    a = [1.0 / n] * n if weights is None else [float(w) / float(sum(weights)) for w in weights]
    z = sum(ai * r for ai, r in zip(a, rows))
    for _ in range(max_iter):
        dists = [vnorm(z - r) for r in rows]
        b = [ai / max(nu, di) for ai, di in zip(a, dists)]
        new = sum(bi * r for bi, r in zip(b, rows)) / sum(b)
        moved = vnorm(new - z)
        z = new
        # Stop on a step small against the (lower) median distance, nu the floor.
        if moved <= tol * max(statistics.median_low(dists), nu):
            break
    return finish(z, clip, med)


def ref_centered_clipping(x, tau=None, iters=1, v=None):
    rows = list(x)
    v = torch.zeros(x.shape[1], dtype=x.dtype) if v is None else v.clone()
    for _ in range(iters):
        dists = [vnorm(r - v) for r in rows]
        t = statistics.median(dists) if tau is None else tau
        v = v + sum((r - v) * min(1.0, t / dd) if dd > 0 else r - v for r, dd in zip(rows, dists)) / len(rows)
    return v


def ref_norm_clipping(x, tau=None):
    norms = [vnorm(r) for r in x]
    t = statistics.median(norms) if tau is None else tau
    return sum(r * min(1.0, t / nm) for r, nm in zip(x, norms)) / len(x)


def ref_nnm(x, f):
    n = len(x)
    mixed = []
    for i in range(n):
        order = sorted(range(n), key=lambda j: (-1.0 if j == i else dist(x[i], x[j], "euclidean"), j))
        mixed.append(sum(x[j] for j in order[: n - f]) / (n - f))
    return torch.stack(mixed)


def ref_bucketing(x, s, seed):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.stack([sum(x[i] for i in perm[b:b + s]) / len(perm[b:b + s]) for b in range(0, len(x), s)])


def ref_fedseca(x, gamma=0.9):
    n, d = x.shape
    sg = [[(s > 0) - (s < 0) for s in map(float, row)] for row in x]
    sigma = [[sum(a * b for a, b in zip(sg[k], sg[l])) / d for l in range(n)] for k in range(n)]
    rho = [max(0.0, sum((s > 0) - (s < 0) for s in sigma[k]) / n) for k in range(n)]
    elected = []
    for j in range(d):
        vote = sum(rho[k] * sg[k][j] for k in range(n))
        elected.append((vote > 0) - (vote < 0))
    norms = [vnorm(r) for r in x]
    med = statistics.median(norms)
    clipped = [[float(v) * min(1.0, med / norms[k]) for v in x[k]] for k in range(n)]
    taus = [float(np.quantile(np.abs(x[k].numpy()), gamma)) for k in range(n)]
    out = []
    for j in range(d):
        mu = statistics.median(abs(clipped[k][j]) for k in range(n))
        vals = []
        for k in range(n):
            v = math.copysign(min(mu, abs(clipped[k][j])), clipped[k][j])
            if gamma > 0 and abs(float(x[k][j])) <= taus[k]:
                v = 0.0
            if elected[j] * v > 0:
                vals.append(v)
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out, dtype=x.dtype), elected, rho


def ref_stpa_kept(x, s_t):
    n = len(x)
    sim = [[cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    dmat = np.array([[0.0 if i == j else max(0.0, 1.0 - sim[i][j]) for j in range(n)] for i in range(n)])
    labels = fcluster(linkage(squareform(dmat, checks=False), method="complete"), t=2, criterion="maxclust")
    a = [i for i in range(n) if labels[i] == 1]
    b = [i for i in range(n) if labels[i] == 2]
    cross = max(sim[i][j] for i in a for j in b)
    if cross < s_t and len(a) != len(b):
        return a if len(a) > len(b) else b
    return list(range(n))


def ref_stpa_step(agg, v, beta, eta0):
    v = agg.clone() if v is None else beta * v + (1 - beta) * agg
    c = cos(agg, v)
    return (torch.zeros_like(agg) if c <= 0 else eta0 * c * v), v


def ref_vdc_scores(x, probes, mode, seq=False):
    feats = []
    for row in x:
        model = TinySeq().double() if seq else model_fn().double()
        layout = LAYOUT if not seq else None
        if seq:
            from proto.layout import Layout
            layout = Layout.from_module(model)
        w = row.clone()
        for layer in layout:
            if mode == "local" or layer.is_buffer:
                w[layer.slice] += (GLOBAL if not seq else torch.zeros(layout.d, dtype=torch.float64))[layer.slice]
        layout.load_into(model, w)
        model.eval()
        with torch.no_grad():
            feats.append(model.features(probes) if not seq else torch.nn.Sequential(*list(model)[:-1])(probes))
    n, p = len(x), probes.shape[0]
    scores = []
    for i in range(n):
        s = 0.0
        for j in range(n):
            if j != i:
                s += sum(cos(feats[i][q], feats[j][q]) for q in range(p)) / p
        scores.append(s / (n - 1))
    return scores


def run(name, params, x, f=F, state=None, seed=1, layout=LAYOUT, mf=None):
    ctx = context(f=f, state=state, seed=seed, n=x.shape[0], layout=layout)
    if mf is not None:
        ctx.model_fn = mf
        ctx.global_weights = torch.zeros(layout.d, dtype=x.dtype)
    return build_defense(name, params)(x, ctx)


def close(a, b):
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), float((a - b).abs().max())


# ----------------------------------------------------------------------- tests

LCA = list(itertools.product((False, True), ("euclidean", "cosine"), (None, "median", "median-output")))


@pytest.mark.parametrize("layerwise,kind,clip", LCA)
@pytest.mark.parametrize("m", [1, None, 4])
def test_krum_and_multikrum(layerwise, kind, clip, m):
    x = data()
    name, extra = ("krum", {}) if m == 1 else ("multikrum", {"m": m})
    got = run(name, {"layerwise": layerwise, "distance": kind, "clip": clip, **extra}, x).delta
    close(got, per_layer(lambda s: ref_multikrum(s, F, m, kind, clip), x, layerwise))


@pytest.mark.parametrize("layerwise,kind,clip", LCA)
def test_geomed(layerwise, kind, clip):
    x = data(1)
    got = run("geomed", {"layerwise": layerwise, "distance": kind, "clip": clip}, x).delta
    close(got, per_layer(lambda s: ref_geomed(s, kind, clip), x, layerwise))


@pytest.mark.parametrize("layerwise,kind,clip", LCA)
@pytest.mark.parametrize("selection,reduction", [("iterative", "closest-to-median"), ("one-shot", "trimmed-mean"),
                                                 ("iterative", "trimmed-mean"), ("one-shot", "closest-to-median")])
def test_bulyan(layerwise, kind, clip, selection, reduction):
    x = data(2)
    got = run("bulyan", {"layerwise": layerwise, "distance": kind, "clip": clip, "selection": selection,
                         "reduction": reduction}, x).delta
    close(got, per_layer(lambda s: ref_bulyan(s, F, kind, clip, selection, reduction), x, layerwise))


def test_bulyan_with_f_zero_and_odd_sizes():
    for n, f in ((3, 0), (8, 1), (12, 2)):
        x = data(3, n=n, outliers=f)
        close(run("bulyan", {}, x, f=f).delta, ref_bulyan(x, f, "euclidean", None, "iterative", "closest-to-median"))


@pytest.mark.parametrize("n", [1, 2, 14, 15])
def test_median(n):
    x = data(4, n=n, outliers=min(n, 2))
    close(run("median", {}, x).delta, ref_median(x))


@pytest.mark.parametrize("beta,k", [(None, F), (0.2, 3), (0.0, 0), (0.45, 6)])
def test_trimmed_mean(beta, k):
    x = data(5)
    close(run("trimmed_mean", {} if beta is None else {"beta": beta}, x).delta, ref_trimmed(x, k))


@pytest.mark.parametrize("params", [{}, {"weighted": True}, {"max_iter": 3}, {"clip": "median", "layerwise": True},
                                    {"clip": "median-output", "tol": 0.0, "max_iter": 40}])
def test_rfa(params):
    x = data(6)
    ref_params = {k: v for k, v in params.items() if k in ("max_iter", "tol")}
    weights = (torch.arange(1, N + 1) * 10).tolist() if params.get("weighted") else None
    fn = lambda s: ref_rfa(s, weights=weights, clip=params.get("clip"), **ref_params)  # noqa: E731
    close(run("rfa", params, x).delta, per_layer(fn, x, params.get("layerwise", False)))


@pytest.mark.parametrize("params", [{}, {"tau": 0.3, "iters": 3}, {"iters": 4}])
def test_centered_clipping_over_rounds(params):
    state: dict = {}
    v = None
    for r in range(3):
        x = data(7 + r)
        got = run("centered_clipping", params, x, state=state).delta
        v = ref_centered_clipping(x, params.get("tau"), params.get("iters", 1), v)
        close(got, v)


def test_centered_clipping_zero_start_ignores_history():
    state: dict = {}
    run("centered_clipping", {"start": "zero"}, data(7), state=state)
    x = data(8)
    close(run("centered_clipping", {"start": "zero"}, x, state=state).delta, ref_centered_clipping(x))


@pytest.mark.parametrize("tau", [None, 0.5])
def test_norm_clipping(tau):
    x = data(9)
    close(run("norm_clipping", {} if tau is None else {"tau": tau}, x).delta, ref_norm_clipping(x, tau))
    # Any inner rule sees the clipped rows.
    norms = [vnorm(r) for r in x]
    t = statistics.median(norms) if tau is None else tau
    clipped = torch.stack([r * min(1.0, t / nm) for r, nm in zip(x, norms)])
    got = run("norm_clipping", {"inner": "median", **({} if tau is None else {"tau": tau})}, x).delta
    close(got, ref_median(clipped))


@pytest.mark.parametrize("inner", ["median", "krum", "mean"])
def test_nnm(inner):
    x = data(10)
    mixed = ref_nnm(list(x), F)
    expected = {"median": lambda: ref_median(mixed), "mean": lambda: mixed.mean(0),
                "krum": lambda: ref_multikrum(mixed, F, 1, "euclidean", None)}[inner]()
    close(run("nnm", {"inner": inner}, x).delta, expected)


@pytest.mark.parametrize("s,inner", [(2, "median"), (3, "mean"), (4, "trimmed_mean")])
def test_bucketing(s, inner):
    x = data(11)
    means = ref_bucketing(list(x), s, seed=1)
    expected = {"median": ref_median, "mean": lambda m: m.mean(0),
                "trimmed_mean": lambda m: ref_trimmed(m, 1)}[inner](means)
    close(run("bucketing", {"s": s, "inner": inner}, x, f=1 if inner == "trimmed_mean" else F).delta, expected)


@pytest.mark.parametrize("gamma", [0.9, 0.5, 0.0])
def test_fedseca(gamma):
    x = data(12)
    x[5, 7] = 0.0  # a zero coordinate: no sign, no vote
    res = run("fedseca", {"gamma": gamma}, x)
    expected, elected, rho = ref_fedseca(x, gamma)
    close(res.delta, expected)
    assert res.diagnostics["elected_sign"].tolist() == elected
    close(res.diagnostics["concordance"], torch.tensor(rho, dtype=x.dtype))


def test_fedseca_momentum_over_rounds():
    state: dict = {}
    m = None
    for r in range(3):
        x = data(13 + r)
        got = run("fedseca", {"momentum": True, "beta": 0.3}, x, state=state).delta
        g = ref_fedseca(x)[0]
        m = g if m is None else 0.3 * m + 0.7 * g
        close(got, m)


@pytest.mark.parametrize("params", [{}, {"s_t": 0.5, "beta": 0.3, "eta0": 1.5}, {"s_t": 0.9, "inner": "mean"}])
def test_stpa_over_rounds(params):
    state: dict = {}
    v = None
    s_t, beta, eta0 = params.get("s_t", 0.02), params.get("beta", 0.5), params.get("eta0", 1.0)
    inner = ref_median if params.get("inner", "median") == "median" else (lambda m: m.mean(0))
    for r, sign in enumerate((1.0, 1.0, -0.5)):
        x = sign * data(16 + r)
        got = run("stpa", params, x, state=state)
        kept = ref_stpa_kept(list(x), s_t)
        expected, v = ref_stpa_step(inner(x[kept]), v, beta, eta0)
        close(got.delta, expected)
        assert got.diagnostics["cluster_kept"].nonzero().flatten().tolist() == kept


@pytest.mark.parametrize("params", [{}, {"model": "delta"}, {"m": 5, "probes": 3, "inner": "median"}])
def test_vdc(params):
    x = data(19, outliers=3)
    for layer in LAYOUT:  # keep running variances positive (NaN features are a behaviour test)
        if layer.is_buffer:
            x[:, layer.slice] *= 0.1
    probes = torch.randn((params.get("probes", 32), 6), generator=torch.Generator().manual_seed(1)).double()
    scores = ref_vdc_scores(list(x), probes, params.get("model", "local"))
    m = params.get("m", F)
    kept = sorted(sorted(range(N), key=lambda i: (scores[i], i))[m:])
    res = run("vdc", params, x)
    close(res.diagnostics["scores"], torch.tensor(scores, dtype=x.dtype))
    inner = ref_median if params.get("inner") == "median" else (lambda m_: m_.mean(0))
    close(res.delta, inner(x[kept]))
    assert res.accepted.nonzero().flatten().tolist() == kept


def test_vdc_without_features_method_uses_all_children_but_the_last():
    from proto.layout import Layout

    torch.manual_seed(3)
    layout = Layout.from_module(TinySeq())
    x = 0.1 * torch.randn(N, layout.d, dtype=torch.float64)
    probes = torch.randn((4, 6), generator=torch.Generator().manual_seed(1)).double()
    scores = ref_vdc_scores(list(x), probes, "local", seq=True)
    res = run("vdc", {"probes": 4}, x, layout=layout, mf=lambda: TinySeq())
    close(res.diagnostics["scores"], torch.tensor(scores, dtype=x.dtype))


@pytest.mark.parametrize("n,d", [(7, 100_003), (49, 70_001)])
def test_fedseca_on_long_rows_matches_a_direct_torch_version(n, d):
    # d above the size where the exact quantile switches to its sampled bracket;
    # n = 49 takes the int8 sign-Gram path on CPU (n odd: the median is the middle).
    gamma = 0.9
    g = torch.Generator().manual_seed(20)
    x = 0.1 * torch.randn(d, generator=g, dtype=torch.float64) + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[2, :500] = 0.0
    from proto.layout import Layout

    res = build_defense("fedseca", {"gamma": gamma})(x, context(f=0, layout=Layout.from_shapes([("w", (d,))])))
    s = torch.sign(x)
    rho = torch.sign(s @ s.T).mean(1).clamp_min(0)
    elected = torch.sign(rho @ s)
    norms = x.norm(dim=1)
    clipped = x * torch.clamp(norms.median() / norms, max=1.0)[:, None]   # n odd: median is the middle
    mu = clipped.abs().median(0).values
    vals = torch.sign(clipped) * torch.minimum(clipped.abs(), mu)
    tau = torch.kthvalue(x.abs(), int(gamma * (d - 1)) + 1, dim=1).values
    # The lower order statistic keeps the same set as numpy's interpolated quantile under ">".
    np_tau = np.quantile(np.abs(x.numpy()), gamma, axis=1)
    assert torch.equal(x.abs() > tau[:, None], x.abs() > torch.from_numpy(np_tau)[:, None])
    vals[x.abs() <= tau[:, None]] = 0
    agree = (vals * elected) > 0
    expected = (vals * agree).sum(0) / agree.sum(0).clamp_min(1)
    close(res.delta, expected)
    assert torch.equal(res.diagnostics["elected_sign"].double(), elected)
