"""Local model poisoning attacks of Fang, Cao, Jia & Gong (USENIX Security 2020),
"Local Model Poisoning Attacks to Byzantine-Robust Federated Learning", in delta terms.

The paper crafts local *models* around the received global model ``w_Re``; with
deltas the global model is the origin, so ``w_Re - λs`` becomes the delta ``-λs``.
``s`` is the sign of the honest change direction, estimated as ``sign(mean delta)``
of the benign updates the node knows.

Knowledge: with ``ctx.honest`` set the attack is the paper's *full-knowledge*
variant; otherwise it is the *partial-knowledge* variant, which uses the
colluders' own benign (before-attack) deltas in place of the honest ones.

APPROXIMATION in the partial-knowledge variant: the colluders know ``k`` benign
deltas, often fewer than the round's ``n - f`` honest ones (``k = 1`` for a lone
node). ``fang_krum`` then completes its simulated Krum matrix to ``n - f`` honest rows
drawn around the known rows' mean with their spread
(:func:`attacks.base.simulated_honest`), so λ is searched against a matrix of the real
round's size rather than ``[k rows; f copies]`` (where Krum trivially picks the
copies at the first λ). ``fang_trmean`` needs a spread: with one known row, whose
std is zero (the attack then sent the benign row itself), the spread is the row's
per-layer coordinate std (:func:`attacks.base.layer_spread`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (AttackContext, UpdateAttackBase, benign_mean_spread, check_number, rand, reference_stats,
                   simulated_honest)


def pairwise_distances(rows: Tensor) -> Tensor:
    """Euclidean distances ``[m, m]`` from one Gram-matrix product, in float64."""
    r = rows.double()
    return torch.cdist(r, r, compute_mode="use_mm_for_euclid_dist")


def krum_index_from_d2(d2: Tensor, f: int) -> int:
    """The row Krum (Blanchard et al. 2017) selects given squared distances ``[m, m]``:
    the smallest sum of squared distances to its ``m - f - 2`` nearest other rows
    (clamped to [1, m - 1])."""
    m = d2.shape[0]
    if m == 1:
        return 0
    k = min(max(m - f - 2, 1), m - 1)
    d2 = d2.clone()
    d2.fill_diagonal_(math.inf)
    scores = d2.topk(k, dim=1, largest=False).values.sum(dim=1)
    return int(scores.argmin())


def _with_copies_d2(benign_d2: Tensor, cross: Tensor, c: int) -> Tensor:
    """Squared distances of ``[benign; c copies of a row]`` from the benign block and
    the ``[h]`` row-to-benign squared distances ``cross`` (copies are 0 apart)."""
    h = benign_d2.shape[0]
    d2 = benign_d2.new_zeros((h + c, h + c))
    d2[:h, :h] = benign_d2
    d2[:h, h:] = cross[:, None]
    d2[h:, :h] = cross[None, :]
    return d2


def fang_lambda_bound(benign: Tensor, c: int) -> float:
    """Fang et al.'s upper bound on λ (Sec. 4.2, Krum), with ``m = h + c``:

    ``1 / ((m - 2c - 1) sqrt(d)) * min_i sum_{l in Γ(i, m-c-2)} D(w_l, w_i)
    + 1 / sqrt(d) * max_i D(w_i, w_Re)``, where Γ(i, k) are the k benign rows
    nearest to row i and ``D(w_i, w_Re)`` is the norm of benign delta i. Counts
    that the partial-knowledge setting makes non-positive are clamped (the
    denominator to >= 1, the neighbour count to [0, h - 1]); the bound only seeds
    the halving search.
    """
    h, d = benign.shape
    m = h + c
    dist = pairwise_distances(benign)
    k = min(max(m - c - 2, 0), h - 1)
    term1 = 0.0
    if k > 0:
        dist.fill_diagonal_(math.inf)
        near = dist.topk(k, dim=1, largest=False).values.sum(dim=1)
        term1 = float(near.min()) / (max(m - 2 * c - 1, 1) * math.sqrt(d))
    term2 = float(benign.double().norm(dim=1).max()) / math.sqrt(d)
    return term1 + term2


@dataclass(frozen=True, kw_only=True)
class FangKrumConfig:
    """lambda_init: first λ tried (None: Fang's bound); threshold: smallest λ tried."""

    lambda_init: float | None = None
    threshold: float = 1e-5

    def __post_init__(self) -> None:
        check_number(self, "lambda_init", lo=0.0, lo_open=True, optional=True)
        check_number(self, "threshold", lo=0.0, lo_open=True)


class FangKrum(UpdateAttackBase):
    """Fang et al.'s attack on Krum: send ``-λ s``, with λ halved from its upper bound
    until Krum (with ``f`` Byzantine, over ``[benign rows; f copies]``) selects the
    crafted update. If no λ >= ``threshold`` is selected, the smallest one tried is
    sent. Needs colluders (partial knowledge) or the honest updates (full knowledge).
    """

    name = "fang_krum"
    needs = "colluders"

    def __init__(self, config: FangKrumConfig) -> None:
        super().__init__(config)

    last_filled: int = 0  # synthetic honest rows in the latest round's simulated Krum matrix

    def _craft(self, ctx: AttackContext) -> Tensor:
        sim = simulated_honest(ctx)  # known benign rows, completed to n - f when fewer are known
        benign, self.last_filled = sim.rows, sim.filled
        h = benign.shape[0]
        c = max(ctx.f, 1)
        s = torch.sign(sim.mu)
        lam = self.config.lambda_init if self.config.lambda_init is not None else fang_lambda_bound(benign, c)
        benign_d2 = pairwise_distances(benign).pow(2)
        # ||b_i + lam s||^2 = ||b_i||^2 + 2 lam <b_i, s> + lam^2 ||s||^2: O(h) per lam
        b64, s64 = benign.double(), s.double()
        sq, dots, ss = b64.pow(2).sum(dim=1), b64 @ s64, float(s64 @ s64)
        crafted = -lam * s
        for _ in range(200):  # halving from any finite start reaches the threshold well before this
            if lam < self.config.threshold:
                break
            crafted = -lam * s
            cross = (sq + 2 * lam * dots + lam * lam * ss).clamp_min(0.0)
            if krum_index_from_d2(_with_copies_d2(benign_d2, cross, c), c) >= h:
                return crafted
            lam /= 2.0
        return crafted


@dataclass(frozen=True, kw_only=True)
class FangTrmeanConfig:
    """b: how far past the benign extreme the full-knowledge values may go (> 1)."""

    b: float = 2.0

    def __post_init__(self) -> None:
        check_number(self, "b", lo=1.0, lo_open=True)


class FangTrmean(UpdateAttackBase):
    """Fang et al.'s attack on trimmed mean and median: per coordinate, values just
    past the benign extreme on the side opposite to the honest direction, sampled
    with the node's generator. Needs colluders (partial knowledge) or the honest
    updates (full knowledge).

    Per coordinate j, with ``s_j = sign(mean_j)`` (0 counts as +):

    * full knowledge (``ctx.honest``), with ``w_max``/``w_min`` the benign extremes:
      if ``s_j >= 0`` sample uniformly in ``[w_min/b, w_min]`` (``w_min > 0``) or
      ``[b w_min, w_min]`` (``w_min <= 0``); if ``s_j < 0`` in ``[w_max, b w_max]``
      (``w_max > 0``) or ``[w_max/b, w_max]`` (``w_max <= 0``);
    * partial knowledge (colluders), with ``mu``/``sigma`` their mean/std:
      ``[mu - 4 sigma, mu - 3 sigma]`` if ``s_j >= 0`` else ``[mu + 3 sigma, mu + 4 sigma]``.
    """

    name = "fang_trmean"
    needs = "colluders"

    def __init__(self, config: FangTrmeanConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        benign = reference_stats(ctx).float()
        mu, sigma = benign_mean_spread(benign, ctx.slices)  # one known row: its per-layer spread
        up = mu >= 0  # honest pushes this coordinate up: go below the benign range
        b = self.config.b
        if ctx.honest is not None:
            w_min, w_max = benign.min(dim=0).values, benign.max(dim=0).values
            lo = torch.where(up, torch.where(w_min > 0, w_min / b, w_min * b),
                             w_max)
            hi = torch.where(up, w_min,
                             torch.where(w_max > 0, w_max * b, w_max / b))
        else:
            lo = torch.where(up, mu - 4 * sigma, mu + 3 * sigma)
            hi = torch.where(up, mu - 3 * sigma, mu + 4 * sigma)
        u = rand((mu.shape[0],), ctx.generator, mu.device)
        return lo + u * (hi - lo)
