"""GeoMed as a medoid: the update minimising the sum of its distances to all others.

This is GeoMed as the Layerwise Cosine Aggregation paper defines it (Sec. 2.4,
after El Mhamdi et al. 2018 and Rousseeuw 1985): the medoid stands in for the
geometric median, which :mod:`.rfa` computes properly. Distances are Euclidean
(not squared: a sum of squared distances is minimised next to the mean, which
is not robust) or, with ``distance = "cosine"``, ``1 - cos`` substituted for
them as the paper does. No requirement on ``n`` and ``f`` (breakdown point
below 1/2); ties go to the lowest index. Takes the Layerwise Cosine options.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import mask_of, stable_order
from ._geometry import Geometry
from ._gram_rule import DistanceOptions, GramRule, Selection
from .base import RoundContext


@dataclass(frozen=True, kw_only=True)
class GeoMedConfig(DistanceOptions):
    """GeoMed (medoid)."""


class GeoMed(GramRule):
    """GeoMed: the medoid, the update with the smallest sum of distances to all others."""

    name = "geomed"

    def select(self, geom: Geometry, ctx: RoundContext, f: int) -> Selection:
        dist = geom.euclidean() if self.config.distance == "euclidean" else geom.cosine_distance()
        scores = dist.sum(1)
        chosen = stable_order(scores)[:1]
        weights = torch.zeros(geom.n, dtype=torch.float64)
        weights[chosen] = 1.0
        return Selection(accepted=mask_of(chosen, geom.n, torch.device("cpu")), weights=weights, scores=scores)
