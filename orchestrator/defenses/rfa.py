"""RFA: the geometric median by smoothed Weiszfeld iterations (Pillutla, Kakade,
Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022).

``z = argmin_z sum_i a_i ||z - x_i||`` approximated by
``z <- sum_i b_i x_i / sum_i b_i``, ``b_i = a_i / max(nu, ||z - x_i||)``, from the
(weighted) mean, until an iteration moves ``z`` by at most ``tol`` times
``max(nu, median_i ||z - x_i||)`` (the lower median) or ``max_iter``
iterations. The median distance is the scale, not the objective, whose
relative change one huge distance keeps tiny (that rule stopped with the
iterate 2.6e10 away from the honest rows when one update held 1e19); ``nu`` is
the absolute floor. Weights ``a_i`` are uniform, or the sample counts with
``weighted = true``. Breakdown point 1/2 (no parameter ``f``); every client
contributes with its final Weiszfeld weight (reported in ``weights``).

Every iterate is a convex combination ``z = c^T X`` of the rows, so the
iterations run on the ``n``-vector ``c`` alone: ``||z - x_i||^2 = G_ii - 2 (G c)_i
+ c^T G c`` from the Gram matrix (centred on a reference row: translation
does not change it, and it keeps float32 exact, see :func:`._geometry.frame`).
The ``[n, d]`` matrix is read twice in all (one Gram product, one final
``c^T X``), however many iterations run.
Options ``layerwise`` and ``clip`` as in :mod:`._gram_rule` (Euclidean only).
Among aggregation ranks the Gram matrix is summed from column spans and the
Weiszfeld loop (``n``-vector work) runs on every rank on the same summed
matrix; ``c^T X`` is computed on column spans (:mod:`._gram_rule`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Config, option
from ._geometry import Geometry
from ._gram_rule import CLIPS, GramRule, Selection
from .base import RoundContext


@dataclass(frozen=True, kw_only=True)
class RFAConfig(Config):
    """RFA (smoothed Weiszfeld geometric median)."""

    weighted: bool = option(False, doc="weight clients by their sample counts")
    max_iter: int = option(100, check=lambda v: v >= 1, rule="must be >= 1", doc="Weiszfeld iterations at most")
    nu: float = option(1e-6, check=lambda v: v > 0, rule="must be > 0", doc="smoothing: distances below nu count as nu")
    tol: float = option(1e-6, check=lambda v: v >= 0, rule="must be >= 0",
                        doc="stop when a step moves z by at most tol * max(nu, median distance)")
    layerwise: bool = option(False, doc="one geometric median per layer")
    clip: str | None = option(None, *CLIPS, doc="clip inputs (or the output) to the round's median norm")


class RFA(GramRule):
    """RFA: geometric median of the updates by smoothed Weiszfeld iterations (breakdown point 1/2)."""

    name = "rfa"

    def select(self, geom: Geometry, ctx: RoundContext, f: int) -> Selection:
        n = geom.n
        if self.config.weighted and ctx.sample_counts is not None:
            a = ctx.sample_counts.to("cpu", torch.float64)
            a = a / a.sum()
        else:
            a = torch.full((n,), 1.0 / n, dtype=torch.float64)
        # ``g`` may be centred on a reference row: z - x_i is translation-invariant
        # because the coefficients c sum to 1.
        g = geom.g
        sq = g.diagonal()
        nu, tol = self.config.nu, self.config.tol
        c = a.clone()
        iters = 0
        for iters in range(1, self.config.max_iter + 1):
            gc = g @ c
            dist = (sq - 2.0 * gc + c @ gc).clamp_min(0.0).sqrt()
            b = a / dist.clamp_min(nu)
            new = b / b.sum()
            # Stop when the step is small against the median distance (not the
            # objective: one huge distance dominates it and would end the
            # iterations while the honest part is still far from converged);
            # nu is the absolute floor (finer than nu, distances are smoothed anyway).
            step = new - c
            moved = float((step @ (g @ step)).clamp_min(0.0).sqrt())
            c = new
            if moved <= tol * max(float(dist.median()), nu):
                break
        gc = g @ c
        dist = (sq - 2.0 * gc + c @ gc).clamp_min(0.0).sqrt()
        objective = float(a @ dist)
        return Selection(accepted=torch.ones(n, dtype=torch.bool), weights=c, scores=dist,
                         info={"iterations": iters, "objective": objective})
