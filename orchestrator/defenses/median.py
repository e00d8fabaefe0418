"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018).

Each coordinate of the aggregate is the median of that coordinate over the
``n`` updates; for even ``n`` the mean of the two middle values. Tolerates
``f < n / 2`` (no parameter needed). Every update is reported accepted: the rule
discards values, not clients. An update holding NaN is left out (and
reported not accepted) when it would make the median NaN; Inf values are
extreme values like any other. Per-column order statistics come from
:mod:`._order` (on CPU pruned sorting networks over blocks of columns, or from
64 clients on numpy's AVX-512 sort of each column: :func:`._order.kernel`). Among
aggregation ranks each takes a span of columns, all-gathered (bit-for-bit the
one-rank result).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Config, without_rows
from ._geometry import all_finite, nonfinite_rows
from ._split import by_columns, shards_of
from ._order import column_median, sorted_block_width
from .base import DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class MedianConfig(Config):
    """Coordinate-wise median (no parameters)."""


class Median:
    """Coordinate-wise median (mean of the two middle values for even n)."""

    name = "median"

    def __init__(self, config: MedianConfig) -> None:
        self.config = config

    def min_clients(self, f: int) -> int:
        return 1

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, _ = check_updates(updates)
        delta = by_columns(updates, shards_of(ctx), column_median, align=sorted_block_width(n))
        if not all_finite(delta):
            # NaN spreads through the sorting network (an Inf is just the largest
            # value): leave out the rows holding NaN or Inf, take the median of the rest.
            bad = nonfinite_rows(updates)
            if bad.any():
                return without_rows(self.name, updates, ctx, bad, self)
        return DefenseResult(delta=delta, accepted=torch.ones(n, dtype=torch.bool, device=updates.device))
