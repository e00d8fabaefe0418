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
from ._order import Scratch, map_sorted_columns, positive_
from .base import RoundContext


@dataclass(frozen=True, kw_only=True)
class BulyanConfig(DistanceOptions):
    """Bulyan."""

    selection: str = option("iterative", "iterative", "one-shot",
                            doc="Krum re-run on the shrinking pool (El Mhamdi) or one-shot top scores (LCA code)")
    reduction: str = option("closest-to-median", "closest-to-median", "trimmed-mean",
                            doc="per coordinate: n - 4f values closest to the median, or drop f each side")


class Bulyan(GramRule):
    """Bulyan: Krum-select n - 2f updates, then per coordinate average the n - 4f values closest to the median (n >= 4f + 3)."""

    name = "bulyan"

    index_info = ("order",)

    def check(self, n: int, f: int) -> None:
        need(n >= 4 * f + 3, self.name, "n >= 4f + 3", n, f)

    def min_clients(self, f: int) -> int:
        return 4 * f + 3

    def select(self, geom: Geometry, ctx: RoundContext, f: int) -> Selection:
        n = geom.n
        theta = n - 2 * f
        dist = geom.dissimilarity(self.config.distance)
        first = krum_scores(dist, f)
        if self.config.selection == "one-shot":
            chosen = stable_order(first)[:theta]
        else:
            # Krum on the shrinking pool: chosen rows and columns leave the
            # distance matrix (+inf), so each round is one top-k over the rest.
            live = dist.clone()
            live.fill_diagonal_(float("inf"))
            inf = float("inf")
            picked = []
            for size in range(n, n - theta, -1):
                k = min(max(size - f - 2, 1), size - 1)
                scores = torch.topk(live, k, dim=1, largest=False).values.sum(1) if size > 1 else \
                    torch.zeros(n, dtype=dist.dtype)
                scores[picked] = inf
                j = int(torch.argmin(scores))  # first minimum: lowest index
                picked.append(j)
                live[j, :] = inf
                live[:, j] = inf
            chosen = torch.tensor(picked, dtype=torch.long)
        return Selection(accepted=mask_of(chosen, n, torch.device("cpu")), rows=torch.sort(chosen).values,
                         scores=first, info={"order": chosen})

    def reduce_rows(self, x: torch.Tensor, rows: torch.Tensor, scale: Optional[torch.Tensor], f: int,
                    out: torch.Tensor) -> None:
        theta = int(rows.numel())
        beta = theta - 2 * f
        if self.config.reduction == "trimmed-mean":
            def fn(r: Sequence[torch.Tensor], cols: slice, ws: Scratch) -> None:
                kept = torch.stack(list(r[f:theta - f]), out=ws("kept", beta, r[0].numel()))
                torch.sum(kept, 0, out=out[cols]).div_(beta)
        else:
            offsets = torch.arange(beta, device=x.device)[:, None]

            def fn(r: Sequence[torch.Tensor], cols: slice, ws: Scratch) -> None:
                y = torch.stack(list(r), out=ws("sorted", theta, r[0].numel()))
                twice_median = r[(theta - 1) // 2] + r[theta // 2]
                # The beta values closest to the median are a run y[a : a + beta] of
                # the sorted values. Sliding the run up by one swaps y[t] for
                # y[t + beta], worth it while y[t] is the farther of the two, i.e.
                # y[t] + y[t + beta] < 2 median; that test only flips once as t
                # grows, so a counts the t in [0, 2f) that pass (ties stay low).
                w = y.shape[1]
                start = positive_(torch.sub(twice_median, y[:2 * f], out=ws("gap", 2 * f, w)).sub_(y[beta:])).sum(0).long()
                index = torch.add(start, offsets, out=ws("index", beta, w, torch.int64))
                torch.sum(torch.gather(y, 0, index, out=ws("gathered", beta, w)), 0, out=out[cols]).div_(beta)

        map_sorted_columns(x, fn, rows=rows, scale=scale)
