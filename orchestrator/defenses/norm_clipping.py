"""Norm clipping: scale every update to norm at most ``tau``, then aggregate.

With the default inner rule (mean) this is the clipped mean of Sun et al.,
"Can You Really Backdoor Federated Learning?" (2019). ``tau`` is fixed when
given; by default it is the median of the round's update norms (the choice of
FedSECA and of the Layerwise Cosine paper's median clipping), so at most half
the rows are shrunk. With a mean, each Byzantine row moves the aggregate by at
most ``tau / n``. It is also a pre-aggregator: ``inner`` takes any rule spec.

With a mean inside, the clipped matrix is never built (one weighted matrix-vector
product); other inner rules get a clipped copy of the rows that need it.
Norms are overflow-safe (:func:`._geometry.row_norms`); rows holding NaN or
Inf are left out (not accepted), the rest run with ``f`` lowered by their number.

Among aggregation ranks (``ctx.shards``) the norms are computed on every rank
(one read of the matrix, the same bits everywhere), the clipped mean on
column spans (all-gathered); another inner rule gets the clipped copy on every
rank and splits its own work.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ._common import Config, _inner_min, build_spec, option, sub_context, without_rows
from ._geometry import clip_scales, row_norms
from ._order import median_1d
from ._split import by_columns, shards_of
from .base import DefenseResult, RoundContext, check_updates
from .mean import Mean


@dataclass(frozen=True, kw_only=True)
class NormClippingConfig(Config):
    """Norm clipping."""

    tau: float | None = option(None, check=lambda v: v > 0, rule="must be > 0",
                               doc="norm bound; None: the median norm of the round's updates")
    inner: str | dict = option("mean", doc="rule applied to the clipped updates (name or table)")


class NormClipping:
    """Norm clipping: clip each update to norm tau (default: the median norm), then apply the inner rule (default mean)."""

    name = "norm_clipping"

    def __init__(self, config: NormClippingConfig) -> None:
        self.config = config
        self.inner = build_spec(config.inner, f"{self.name}.inner")

    def min_clients(self, f: int) -> int:
        return _inner_min(self.inner, f)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, _ = check_updates(updates)
        # Overflow-safe norms: a row holding 3e19 has a finite norm, clipped like any other.
        norms, finite = row_norms(updates)
        if not bool(finite.all()):
            return without_rows(self.name, updates, ctx, ~finite, self)
        tau = self.config.tau if self.config.tau is not None else float(median_1d(norms))
        scale = clip_scales(norms, tau)
        diag = {"tau": tau, "clipped": int((scale < 1).sum())}
        if isinstance(self.inner, Mean) and not self.inner.config.weighted:
            w = (scale / n).to(updates.device, updates.dtype)
            delta = by_columns(updates, shards_of(ctx), lambda x: torch.mv(x.T, w))
            return DefenseResult(delta=delta, accepted=torch.ones(n, dtype=torch.bool, device=updates.device),
                                 weights=torch.full((n,), 1.0 / n, dtype=updates.dtype, device=updates.device),
                                 diagnostics=diag)
        rows = updates if bool((scale == 1).all()) else updates * scale.to(updates.device, updates.dtype)[:, None]
        res = self.inner(rows, sub_context(ctx, state_key="inner"))
        res.diagnostics.update(diag)
        return res
