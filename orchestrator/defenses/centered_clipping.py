"""Centered clipping (Karimireddy, He, Jaggi, "Learning from History for
Byzantine Robust Optimization", ICML 2021).

From a centre ``v`` (the previous round's aggregate, kept in ``ctx.state``;
zero in the first round or with ``start = "zero"``), ``iters`` times:
``v <- v + (1/n) sum_i clip_tau(x_i - v)``, ``clip_tau(z) = z min(1, tau / ||z||)``.
``tau`` is fixed when given; by default it is the median of ``||x_i - v||`` at
each iteration (scale-free, and an honest majority keeps it at honest scale).
Tolerates ``f < n / 2``: each Byzantine row moves ``v`` by at most ``tau / n``.

Every iterate stays in the span of ``v_0`` and the rows, so the iterations run
on coefficients: ``v = alpha v_0 + c^T X`` with distances from the Gram matrix
and ``X v_0``. The matrix is read three times in all (Gram, ``X v_0``, output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Config, option
from ._geometry import clip_scales, gram
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

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, d = check_updates(updates)
        g = gram(updates)
        sq = g.diagonal().clamp_min(0)
        prev = ctx.state.get("center") if self.config.start == "previous" else None
        if isinstance(prev, torch.Tensor) and prev.numel() == d:
            v0 = prev.to(updates.device, updates.dtype)
            p = (updates @ v0).to("cpu", torch.float64)
            q = float(v0.double() @ v0.double())
        else:
            v0, p, q = None, torch.zeros(n, dtype=torch.float64), 0.0
        alpha = 1.0
        c = torch.zeros(n, dtype=torch.float64)
        taus = []
        for _ in range(self.config.iters):
            gc = g @ c
            vv = alpha * alpha * q + 2.0 * alpha * float(c @ p) + float(c @ gc)
            dist = (sq - 2.0 * (alpha * p + gc) + vv).clamp_min(0).sqrt()
            tau = self.config.tau if self.config.tau is not None else float(median_1d(dist))
            s = clip_scales(dist, tau)
            keep = 1.0 - float(s.mean())
            alpha *= keep
            c = keep * c + s / n
            taus.append(tau)
        delta = torch.mv(updates.T, c.to(updates.device, updates.dtype))
        if v0 is not None and alpha != 0.0:
            delta.add_(v0, alpha=alpha)
        ctx.state["center"] = delta.detach().clone()
        return DefenseResult(delta=delta, accepted=torch.ones(n, dtype=torch.bool, device=updates.device),
                             weights=c.to(updates.device, updates.dtype),
                             diagnostics={"tau": taus[-1], "center_share": alpha})
