"""Coordinate-wise trimmed mean (Yin et al., ICML 2018).

Per coordinate, drop the ``k`` largest and ``k`` smallest of the ``n`` values and
average the rest, with ``k = f`` (the round's Byzantine count) or, when
``beta`` is set, ``k = floor(beta * n)``. Requirement: ``n > 2k``.

Two kernels (:func:`._order.kernel` picks by ``n``). From a few dozen clients
on, each column is sorted by numpy's AVX-512 sort of the transposed block
(:func:`._order.map_sorted_blocks`) and its middle ``n - 2k`` sorted values are
summed, in sorted order (a column holding NaN gives NaN). For fewer, without
sorting every value: with ``lo``/``hi`` the ``(k+1)``-th smallest and largest
values of a column (a pruned sorting network), the kept values sum to
``sum_i clamp(x_i, lo, hi) - k (lo + hi)`` (ties included). Either way a
column's result depends on that column's values only. Among aggregation ranks
each takes a span of columns, all-gathered (bit-for-bit the one-rank result).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ._common import Config, need, option, without_rows
from ._geometry import all_finite, nonfinite_rows
from ._split import by_columns, shards_of
from ._order import Scratch, _kernel_arg, kernel, map_sorted_blocks, map_sorted_columns, sorted_block_width
from .base import DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class TrimmedMeanConfig(Config):
    """Coordinate-wise trimmed mean."""

    beta: float | None = option(None, check=lambda v: 0 <= v < 0.5, rule="must be in [0, 0.5)",
                                doc="fraction trimmed from each end; None: f values from each end")


def trimmed_mean(x: torch.Tensor, k: int, use: str | None = None) -> torch.Tensor:
    """Mean of the middle ``n - 2k`` values of each column of ``x`` (``use``:
    force a kernel, ``"network"`` or ``"sort"``, for tests and benchmarks)."""
    n = x.shape[0]
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    if k == 0:
        return torch.mean(x, 0, out=out)
    if x.device.type == "cpu" and (_kernel_arg(use) or kernel(n, (k, n - 1 - k))) == "sort":
        def middle(t: torch.Tensor, cols: slice, ws: Scratch) -> None:
            # Each row is one column sorted: sum its kept values along the row.
            o = out[cols]
            torch.sum(t[:, k:n - k], 1, out=o).div_(n - 2 * k)
            nan = torch.isnan(t[:, n - 1])     # NaN sorts last: the column holds one
            if bool(nan.any()):
                o.masked_fill_(nan, float("nan"))

        map_sorted_blocks(x, middle)
        return out

    def fn(r: Sequence[torch.Tensor], cols: slice, ws: Scratch) -> None:
        lo, hi = r[k], r[n - 1 - k]
        kept = torch.minimum(x[:, cols], hi, out=ws("clamped", n, lo.numel()))
        kept = torch.maximum(kept, lo, out=kept).sum(0)
        kept -= (lo + hi) * k
        torch.div(kept, n - 2 * k, out=out[cols])

    map_sorted_columns(x, fn, need=(k, n - 1 - k))
    return out


class TrimmedMean:
    """Coordinate-wise trimmed mean: drop the k largest and k smallest values per coordinate (k = f, or floor(beta n); n > 2k)."""

    name = "trimmed_mean"

    def __init__(self, config: TrimmedMeanConfig) -> None:
        self.config = config

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, _ = check_updates(updates)
        beta = self.config.beta
        k = int(ctx.f) if beta is None else int(math.floor(beta * n))
        need(n > 2 * k, self.name, f"n > 2k with k = {'f' if beta is None else 'floor(beta n)'} = {k}", n, int(ctx.f))
        delta = by_columns(updates, shards_of(ctx), lambda x: trimmed_mean(x, k), align=sorted_block_width(n))
        if not all_finite(delta):
            # NaN spreads through the order statistics, Inf survives when k = 0:
            # leave out the rows holding NaN or Inf, trim the rest.
            bad = nonfinite_rows(updates)
            if bad.any():
                return without_rows(self.name, updates, ctx, bad, self)
        return DefenseResult(delta=delta, accepted=torch.ones(n, dtype=torch.bool, device=updates.device),
                             diagnostics={"trimmed": k})

    def min_clients(self, f: int) -> int:
        # beta < 1/2 trims floor(beta n) < n / 2 values from each end at any n.
        return 2 * f + 1 if self.config.beta is None else 1
