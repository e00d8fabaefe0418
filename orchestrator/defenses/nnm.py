"""Nearest-neighbour mixing, a pre-aggregator (Allouah et al., "Fixing by
Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023).

Each row is replaced by the mean of its ``n - f`` nearest rows in Euclidean
distance (itself included), then the ``inner`` rule (default: coordinate-wise median) aggregates
the mixed rows with the same ``f``. Requirement: ``n > 2f``. Neighbour ties go
to the lowest index. A client is accepted when an accepted mixed row
draws on its update (the output is an average of exactly those clients; the
inner rule's own mask over mixed rows is in ``inner_accepted``, where ties
between identical mixed rows follow its tie-breaking), and its weight is its
share of the output.

Distances come from the Gram matrix; the mixed matrix is one ``[n, n] @ [n, d]``
product (one extra ``n x d`` copy, handed to the inner rule).

Among aggregation ranks (``ctx.shards``) the Gram matrix is summed from the
ranks' column spans (:func:`._split.split_frame`) and the neighbours are found
on every rank from the same summed matrix; the mixing product runs on every
rank (each needs the whole mixed matrix for the inner rule, which then splits
its own work).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ._common import Config, _inner_min, build_spec, need, option, sub_context, through_mixing, without_rows
from ._geometry import Geometry
from ._split import shards_of, split_frame
from .base import DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class NNMConfig(Config):
    """Nearest-neighbour mixing."""

    inner: str | dict = option("median", doc="rule applied to the mixed updates (name or table)")


class NNM:
    """Nearest-neighbour mixing: replace each update by the mean of its n - f nearest, then apply the inner rule (n > 2f)."""

    name = "nnm"

    def __init__(self, config: NNMConfig) -> None:
        self.config = config
        self.inner = build_spec(config.inner, f"{self.name}.inner")

    def min_clients(self, f: int) -> int:
        return max(2 * f + 1, _inner_min(self.inner, f))

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, _ = check_updates(updates)
        f = int(ctx.f)
        need(n > 2 * f, self.name, "n > 2f", n, f)
        fr = split_frame(updates, shards_of(ctx), centre=True)
        if not fr.all_finite:
            # Rows holding NaN/Inf are left out before mixing (0 x NaN is NaN in
            # the mixing product); the rest run with f lowered by their number.
            return without_rows(self.name, updates, ctx, ~fr.finite, self)
        k = n - f
        dist = Geometry(fr).sq_euclidean()
        # Stable sort on (distance, index): a row is always its own nearest.
        dist.fill_diagonal_(-1.0)
        near = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        mix = torch.zeros(n, n, dtype=torch.float64)
        mix.scatter_(1, near, 1.0 / k)
        mixed = mix.to(updates.device, updates.dtype) @ updates
        res = self.inner(mixed, sub_context(ctx, state_key="inner", mixed=True))
        accepted, weights = through_mixing(res, mix, n)
        diag = dict(res.diagnostics)
        diag.update(inner_accepted=res.accepted, neighbours=near)
        return DefenseResult(delta=res.delta, accepted=accepted.to(updates.device),
                             weights=None if weights is None else weights.to(updates.device, updates.dtype),
                             diagnostics=diag)
