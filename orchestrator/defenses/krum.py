"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017).

Each update's score is the sum of its squared distances to its ``n - f - 2``
nearest other updates; Multi-Krum averages the ``m`` lowest-scored updates
(default ``m = n - f``) and Krum is Multi-Krum with ``m = 1``.
Requirement: ``n >= 2f + 3``. Ties in score go to the lowest index.

Both take the Layerwise Cosine Aggregation options (``layerwise``, ``distance``,
``clip``; see :mod:`._gram_rule`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ._common import mask_of, need, option, stable_order
from ._geometry import Geometry
from ._gram_rule import DistanceOptions, GramRule, Selection, krum_scores
from .base import DefenseError, RoundContext

import torch


@dataclass(frozen=True, kw_only=True)
class KrumConfig(DistanceOptions):
    """Krum: the single update with the lowest score."""


@dataclass(frozen=True, kw_only=True)
class MultiKrumConfig(DistanceOptions):
    """Multi-Krum: the mean of the ``m`` lowest-scored updates."""

    m: int | None = option(None, check=lambda v: v >= 1, rule="must be >= 1",
                           doc="how many lowest-scored updates to average; None: n - f")


class MultiKrum(GramRule):
    """Multi-Krum: mean of the m updates with the smallest sum of squared distances to their n - f - 2 nearest neighbours (n >= 2f + 3)."""

    name = "multikrum"

    def check(self, n: int, f: int) -> None:
        need(n >= 2 * f + 3, self.name, "n >= 2f + 3", n, f)

    def min_clients(self, f: int) -> int:
        m = getattr(self.config, "m", 1)
        return max(2 * f + 3, 1 if m is None else m)

    def select(self, geom: Geometry, ctx: RoundContext, f: int) -> Selection:
        n = geom.n
        m = getattr(self.config, "m", 1)
        m = n - f if m is None else m
        if m > n:
            raise DefenseError(f"{self.name}: m = {m} exceeds the n = {n} updates")
        scores = krum_scores(geom.dissimilarity(self.config.distance), f)
        chosen = stable_order(scores)[:m]
        weights = torch.zeros(n, dtype=torch.float64)
        weights[chosen] = 1.0 / m
        return Selection(accepted=mask_of(chosen, n, torch.device("cpu")), weights=weights, scores=scores)


class Krum(MultiKrum):
    """Krum: the update with the smallest sum of squared distances to its n - f - 2 nearest neighbours (n >= 2f + 3)."""

    name = "krum"
