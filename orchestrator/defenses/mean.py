"""Mean aggregation (FedAvg): plain or weighted by each client's sample count.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (2017). Tolerates no Byzantine input (f = 0): one
extreme row moves it anywhere. Among aggregation ranks, each sums a span of
columns and the spans are all-gathered (``ctx.shards``). It never returns a non-finite aggregate: an
update holding NaN/Inf (refused at the server's edge, but rules are also used
directly) or a weighted sum that overflows is a :class:`DefenseError`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._geometry import all_finite
from ._split import by_columns, shards_of
from .base import DefenseError, DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class MeanConfig:
    weighted: bool = False
    """Weight each row by ``ctx.sample_counts`` (FedAvg) instead of uniformly."""


class Mean:
    """Mean of the updates, plain or (weighted = true, FedAvg) weighted by sample counts; tolerates no Byzantine input."""

    name = "mean"

    def __init__(self, config: MeanConfig) -> None:
        self.config = config

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, _ = check_updates(updates)
        if self.config.weighted and ctx.sample_counts is not None:
            w = ctx.sample_counts.to(updates.device, updates.dtype)
            w = w / w.sum()
        else:
            w = torch.full((n,), 1.0 / n, device=updates.device, dtype=updates.dtype)
        delta = by_columns(updates, shards_of(ctx), lambda x: w @ x)
        if not all_finite(delta):
            raise DefenseError(f"{self.name}: the mean is not finite (an update holds NaN or Inf, or the weighted "
                               "sum overflows); the mean tolerates no Byzantine input")
        return DefenseResult(delta=delta, accepted=torch.ones(n, dtype=torch.bool, device=updates.device), weights=w)

    def min_clients(self, f: int) -> int:
        return 1
