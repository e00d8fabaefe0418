"""alie, ipm, fang_krum, fang_trmean, min_max, min_sum and mimic against their definitions."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from attacks import alie_default_z, build_attack


def krum(rows: torch.Tensor, f: int) -> int:
    """Plain Krum: the row with the smallest sum of squared distances to its n - f - 2 nearest."""
    n = rows.shape[0]
    scores = []
    for i in range(n):
        d2 = sorted(float((rows[i] - rows[j]).pow(2).sum()) for j in range(n) if j != i)
        scores.append(sum(d2[: n - f - 2]))
    return min(range(n), key=scores.__getitem__)


@pytest.mark.parametrize("n, f", [(10, 3), (50, 12), (20, 0), (7, 6)])
def test_alie_default_z_formula(n, f):
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-4), 1 - 1e-4)
    assert alie_default_z(n, f) == pytest.approx(norm.ppf(p), abs=1e-9)


def test_alie_is_mean_plus_z_std(make_ctx, honest):
    out = build_attack("alie", {}).craft(make_ctx())
    z = norm.ppf(0.7)  # n=10, f=3: s = 3
    assert torch.allclose(out, honest.mean(0) + z * honest.std(0), atol=1e-5)


def test_alie_small_z_stays_within_the_honest_range(make_ctx, honest):
    out = build_attack("alie", {"z": 0.3}).craft(make_ctx())
    assert bool((out >= honest.min(0).values).all()) and bool((out <= honest.max(0).values).all())


def test_alie_uses_colluder_statistics_without_omniscience(make_ctx, honest):
    out = build_attack("alie", {"z": 1.0}).craft(make_ctx(honest=None))
    col = honest[:3]
    assert torch.allclose(out, col.mean(0) + col.std(0), atol=1e-5)


def test_ipm_is_anti_aligned_with_the_honest_mean(make_ctx, honest):
    out = build_attack("ipm", {"epsilon": 0.5}).craft(make_ctx())
    mu = honest.mean(0)
    assert torch.allclose(out, -0.5 * mu)
    assert float(out @ mu) < 0
    # a large epsilon turns even the plain mean against the honest direction (3 of 10 Byzantine)
    big = build_attack("ipm", {"epsilon": 10}).craft(make_ctx())
    assert float(torch.cat([honest, big.expand(3, -1)]).mean(0) @ mu) < 0


def test_fang_krum_full_knowledge_is_selected_by_krum(make_ctx, honest):
    f = 3
    out = build_attack("fang_krum", {}).craft(make_ctx(f=f))
    s = torch.sign(honest.mean(0))
    lam = float(-(out @ s) / s.abs().sum())
    assert lam > 0 and torch.allclose(out, -lam * s)
    rows = torch.cat([honest, out.expand(f, -1)])
    assert krum(rows, f) >= honest.shape[0]


def test_fang_krum_partial_knowledge_uses_colluders(make_ctx, honest):
    out = build_attack("fang_krum", {}).craft(make_ctx(honest=None))
    s = torch.sign(honest[:3].mean(0))
    lam = float(-(out @ s) / s.abs().sum())
    assert lam > 0 and torch.allclose(out, -lam * s)


def test_fang_trmean_full_knowledge_goes_past_the_benign_extreme(make_ctx, honest):
    out = build_attack("fang_trmean", {}).craft(make_ctx())
    mu = honest.mean(0)
    lo, hi = honest.min(0).values, honest.max(0).values
    up = mu >= 0
    assert bool((out[up] <= lo[up] + 1e-6).all()) and bool((out[~up] >= hi[~up] - 1e-6).all())
    # within the b = 2 band
    assert bool((out[up] >= torch.minimum(lo[up] * 2, lo[up] / 2) - 1e-6).all())
    again = build_attack("fang_trmean", {}).craft(make_ctx())
    other = build_attack("fang_trmean", {}).craft(make_ctx(seed=1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_fang_trmean_partial_knowledge_band(make_ctx, honest):
    out = build_attack("fang_trmean", {}).craft(make_ctx(honest=None))
    col = honest[:3]
    mu, sd = col.mean(0), col.std(0)
    up = mu >= 0
    z = (out - mu) / sd
    assert bool((z[up] <= -3 + 1e-4).all() and (z[up] >= -4 - 1e-4).all())
    assert bool((z[~up] >= 3 - 1e-4).all() and (z[~up] <= 4 + 1e-4).all())


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
def test_min_max_stays_within_the_benign_max_distance(make_ctx, honest, perturbation):
    out = build_attack("min_max", {"perturbation": perturbation}).craft(make_ctx())
    bound = torch.cdist(honest, honest).max()
    reach = torch.cdist(out[None], honest).max()
    assert float(reach) <= float(bound) + 1e-4
    assert float(reach) >= 0.999 * float(bound)  # gamma is as large as allowed
    assert float(out @ honest.mean(0)) < float(honest.mean(0).pow(2).sum())  # pushed against mu


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
def test_min_sum_stays_within_the_benign_max_sum(make_ctx, honest, perturbation):
    out = build_attack("min_sum", {"perturbation": perturbation}).craft(make_ctx())
    bound = torch.cdist(honest, honest).pow(2).sum(1).max()
    total = torch.cdist(out[None], honest).pow(2).sum()
    assert float(total) <= float(bound) * (1 + 1e-5)
    assert float(total) >= 0.999 * float(bound)


def test_min_max_with_colluders_only(make_ctx, honest):
    col = honest[:3]
    out = build_attack("min_max", {}).craft(make_ctx(honest=None))
    assert float(torch.cdist(out[None], col).max()) <= float(torch.cdist(col, col).max()) + 1e-4


def test_mimic_copies_an_honest_update(make_ctx, honest):
    assert torch.equal(build_attack("mimic", {"index": 4}).craft(make_ctx()), honest[4])
    out = build_attack("mimic", {}).craft(make_ctx())
    centred = honest - honest.mean(0)
    _, vecs = torch.linalg.eigh(centred.T.double() @ centred.double())
    top = vecs[:, -1].float()
    expected = int((centred @ top).abs().argmax())
    assert torch.equal(out, honest[expected])
    with pytest.raises(ValueError, match="index=9"):
        build_attack("mimic", {"index": 9}).craft(make_ctx())
