"""Centered clipping (Karimireddy, He, Jaggi, "Learning from History for
Byzantine Robust Optimization", ICML 2021).

From a centre ``v`` (the previous round's aggregate, kept in ``ctx.state``;
zero in the first round or with ``start = "zero"``), ``iters`` times:
``v <- v + (1/n) sum_i clip_tau(x_i - v)``, ``clip_tau(z) = z min(1, tau / ||z||)``.
``tau`` is fixed when given; by default it is the median of ``||x_i - v||`` at
each iteration (scale-free, and an honest majority keeps it at honest scale).
Tolerates ``f < n / 2``: each Byzantine row moves ``v`` by at most ``tau / n``.

Every iterate is an affine combination of ``v_0`` and the rows (coefficients
summing to 1), so the iterations run on coefficients: ``v = alpha v_0 + c^T X``
with distances from the Gram matrix of the rows and ``v_0`` (the origin when
there is no previous centre), centred on a reference row in float32 (see
:func:`._geometry.frame`: exact under a large common part, no overflow for
extreme values). The matrix is read twice in all (Gram, output). Rows holding
NaN or Inf are left out (not accepted, weight 0).

Among aggregation ranks (``ctx.shards``) the Gram matrix is summed from the
ranks' column spans (:func:`._split.split_frame`), the iterations (``n``-vector
work) run on every rank on the same summed matrix, and the output ``c^T X`` is
computed on column spans and all-gathered; the centre kept in ``ctx.state``
is then the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Config, no_finite_rows, option
from ._geometry import all_finite, clip_scales
from ._split import by_columns, shards_of, split_frame
from ._order import median_1d
from .base import DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class CenteredClippingConfig(Config):
    """Centered clipping."""

    tau: float | None = option(None, check=lambda v: v > 0, rule="must be > 0",
                               doc="clipping radius; None: median distance to the centre, per iteration")
    iters: int = option(1, check=lambda v: v >= 1, rule="must be >= 1", doc="clipping iterations per round")
    start: str = option("previous", "previous", "zero", doc="centre: last round's aggregate, or zero")


class CenteredClipping:
    """Centered clipping: move a centre by the mean of the updates' offsets clipped to radius tau (default: their median)."""

    name = "centered_clipping"

    def __init__(self, config: CenteredClippingConfig) -> None:
        self.config = config

    @property
    def sequential(self) -> bool:
        """Starting from last round's centre, the rule keeps state (see :func:`._split.sequential`)."""
        return self.config.start == "previous"

    def min_clients(self, f: int) -> int:
        return 1

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, d = check_updates(updates)
        prev = ctx.state.get("center") if self.config.start == "previous" else None
        v0 = None
        if isinstance(prev, torch.Tensor) and prev.numel() == d:
            v0 = prev.reshape(1, d).to(updates.device, updates.dtype)
            if not all_finite(v0):
                v0 = None  # a corrupted centre: start from zero
        # Points: the n rows, then the start v0 (or the origin): every iterate is an
        # affine combination of them, so a centred frame gives exact distances.
        shards = shards_of(ctx)
        fr = split_frame(updates, shards, centre=True, extra=v0, origin=v0 is None)
        keep = None
        if not fr.all_finite:
            keep = torch.nonzero(fr.finite).flatten()
            if keep.numel() == 0:
                raise no_finite_rows(self.name, n)
            fr = fr.restrict(keep)
        k = fr.n
        g = fr.g
        sq = g.diagonal()[:k]
        a = torch.zeros(k + 1, dtype=torch.float64)
        a[k] = 1.0  # v = a[:k] . x + a[k] * (v0 or 0); the coefficients sum to 1
        taus = []
        for _ in range(self.config.iters):
            ga = g @ a
            dist = (sq - 2.0 * ga[:k] + a @ ga).clamp_min(0).sqrt()
            tau = self.config.tau if self.config.tau is not None else float(median_1d(dist))
            s = clip_scales(dist, tau)
            keep_share = 1.0 - float(s.mean())
            a = a * keep_share
            a[:k] += s / k
            taus.append(tau)
        c, alpha = a[:k], float(a[k])
        if keep is None:
            cw = c.to(updates.device, updates.dtype)
            delta = by_columns(updates, shards, lambda x: torch.mv(x.T, cw))
            weights = c
        else:
            # Rows holding NaN/Inf stay out of the product (0 x NaN is NaN).
            rows = updates.index_select(0, keep.to(updates.device))
            cw = c.to(updates.device, updates.dtype)
            delta = by_columns(rows, shards, lambda x: torch.mv(x.T, cw))
            weights = torch.zeros(n, dtype=torch.float64).index_copy_(0, keep, c)
        if v0 is not None and alpha != 0.0:
            delta.add_(v0[0], alpha=alpha)
        ctx.state["center"] = delta.detach().clone()
        accepted = torch.ones(n, dtype=torch.bool) if keep is None else \
            torch.zeros(n, dtype=torch.bool).index_fill_(0, keep, True)
        diag = {"tau": taus[-1], "center_share": alpha}
        if keep is not None:
            diag["nonfinite"] = torch.nonzero(~accepted).flatten()
        return DefenseResult(delta=delta, accepted=accepted.to(updates.device),
                             weights=weights.to(updates.device, updates.dtype), diagnostics=diag)
