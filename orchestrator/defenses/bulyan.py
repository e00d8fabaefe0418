"""Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of
Distributed Learning in Byzantium", ICML 2018).

Selection: ``theta = n - 2f`` updates chosen by Krum. Reduction: per coordinate,
the mean of the ``beta = theta - 2f`` selected values closest to their median.
Requirement: ``n >= 4f + 3``.

Options (defaults are El Mhamdi et al.'s Bulyan, which is also the rule the
Layerwise Cosine Aggregation paper cites):

``selection = "iterative"`` (default)
    Krum run ``theta`` times, each time on the updates not yet chosen, taking
    its pick out of the pool. Krum's neighbour count ``|pool| - f - 2`` is kept
    at least 1 in the last iterations, where the pool is small.
``selection = "one-shot"``
    The ``theta`` lowest one-shot Krum scores over all ``n`` updates, as the
    Layerwise Cosine paper's reference code does (its text describes Bulyan as
    "the average of the lowest-scored subset").
``reduction = "closest-to-median"`` (default) or ``"trimmed-mean"``
    The latter drops the ``f`` largest and ``f`` smallest selected values per
    coordinate (the reference code's coordinate-wise trimmed mean); both keep
    ``beta`` values, but the closest-to-median set need not be symmetric.

With ``clip = "median"`` the selected rows are clipped before the reduction;
the reference code instead clips the aggregate per layer: ``clip =
"median-output"``. Ties (equal scores, equal distances to the median) go to
the lowest index / the lower value. Takes the Layerwise Cosine options.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._common import mask_of, need, option, stable_order
from ._geometry import Geometry
from ._gram_rule import DistanceOptions, GramRule, Selection, krum_scores
from ._order import map_sorted_columns
from .base import RoundContext


@dataclass(frozen=True, kw_only=True)
class BulyanConfig(DistanceOptions):
    """Bulyan."""

    selection: str = option("iterative", "iterative", "one-shot")
    reduction: str = option("closest-to-median", "closest-to-median", "trimmed-mean")


class Bulyan(GramRule):
    """Bulyan: Krum-select n - 2f updates, then per coordinate average the n - 4f values closest to the median (n >= 4f + 3)."""

    name = "bulyan"

    def check(self, n: int, f: int) -> None:
        need(n >= 4 * f + 3, self.name, "n >= 4f + 3", n, f)

    def select(self, geom: Geometry, ctx: RoundContext, f: int) -> Selection:
        n = geom.n
        theta = n - 2 * f
        dist = geom.dissimilarity(self.config.distance)
        first = krum_scores(dist, f)
        if self.config.selection == "one-shot":
            chosen = stable_order(first)[:theta]
        else:
            pool = torch.arange(n)
            picked = []
            for _ in range(theta):
                scores = krum_scores(dist[pool][:, pool], f)
                j = int(torch.argmin(scores))  # first minimum: lowest index in the pool
                picked.append(int(pool[j]))
                pool = torch.cat([pool[:j], pool[j + 1:]])
            chosen = torch.tensor(picked, dtype=torch.long)
        return Selection(accepted=mask_of(chosen, n, torch.device("cpu")), rows=torch.sort(chosen).values,
                         scores=first, info={"order": chosen})

    def reduce_rows(self, x: torch.Tensor, rows: torch.Tensor, scale: Optional[torch.Tensor], f: int,
                    out: torch.Tensor) -> None:
        theta = int(rows.numel())
        beta = theta - 2 * f
        if self.config.reduction == "trimmed-mean":
            def fn(r: Sequence[torch.Tensor], cols: slice) -> None:
                torch.sum(torch.stack(list(r[f:theta - f])), 0, out=out[cols]).div_(beta)
        else:
            positions = torch.arange(theta, device=x.device)[:, None]

            def fn(r: Sequence[torch.Tensor], cols: slice) -> None:
                y = torch.stack(list(r))
                med = (r[(theta - 1) // 2] + r[theta // 2]) * 0.5
                # The beta values closest to the median are a run of beta
                # consecutive sorted values; of the 2f + 1 candidate runs take the
                # one whose farthest member is nearest (first, i.e. lower, on ties).
                cost = torch.maximum(med - y[:2 * f + 1], y[beta - 1:] - med)
                start = cost.argmin(0)
                window = (positions >= start) & (positions < start + beta)
                torch.sum(y * window, 0, out=out[cols]).div_(beta)

        map_sorted_columns(x, fn, rows=rows, scale=scale)
