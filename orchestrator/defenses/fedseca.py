"""FedSECA: robust sign election and coordinate-wise aggregation (Benjamin et
al., "FedSECA: Sign Election and Coordinate-wise Aggregation of Gradients for
Byzantine Tolerant Federated Learning", CVPR 2025).

1. Concordance ratio (CRISE): ``sigma_kl = (1/d) sum_j sgn(x_kj) sgn(x_lj)`` for
   all pairs at once (the Gram matrix of the sign matrix, summed over column
   blocks so the sign matrix is never stored), and
   ``rho_k = max(0, (1/n) sum_l sgn(sigma_kl))`` (``l = k`` included, as in Eq. 5).
2. Sign election: ``s_j = sgn(sum_k rho_k sgn(x_kj))`` on the raw updates.
3. Variance-reduced sparse rows: clip each row to the median row norm; clamp
   each coordinate's magnitude to the median magnitude of that coordinate over
   the clipped rows; zero the coordinates whose *raw* magnitude is not above the
   row's ``gamma``-quantile (keep the top ``1 - gamma``; ``gamma = 0`` keeps all).
4. RoCA: per coordinate, the mean of the values that are nonzero and agree
   with the elected sign (0 where none does).
5. Optional server momentum: ``m <- beta m + (1 - beta) g`` (``m`` starts at the
   first aggregate so the first step is not shrunk), kept in ``ctx.state``.

Sign convention: the paper aggregates gradients, our rows are deltas (about
``-lr * gradient``). Every step above is odd and positively homogeneous
(concordance is invariant to a global sign flip, the elected sign flips with
the rows, clipping, clamping and sparsification act on magnitudes, RoCA is
odd), so ``FedSECA(-c G) = -c FedSECA(G)``: run on deltas it returns exactly the
delta the paper's gradient aggregate would produce. No parameter ``f``;
assumes an honest majority. A client is reported accepted when its
concordance ratio is positive (it has a vote in the election).

Quantile: ``tau_k`` is the ``floor(gamma (d - 1)) + 1``-th smallest ``|x_kj|``,
which keeps the same set as the linearly interpolated quantile of the paper's
code under strict ``>``. Found exactly (:class:`._order.RowKthAbs`: a sampled
bracket, counted and gathered in the same pass as the sign Gram, then one torch
``kthvalue`` over the gathered values; no copy of the matrix, no size limit).

Cost (BENCHMARKS.md): two passes over the matrix. The first builds the sign
Gram (int8 products from 48 clients on, exact), the row norms and the quantile
bracket; the second sorts each column block's clipped magnitudes for the
median (a pruned sorting network, or from 64 clients on numpy's sort of the
transposed block: :func:`._order.kernel`) and does clamp, sparsify and the sign-aligned
mean in 10 vectorised ops on each ~1 MiB chunk of the block
(:func:`._order.chunk_width`), in per-thread scratch buffers.

Among aggregation ranks (``ctx.shards``) both passes split by column spans
aligned to that pass's blocks, so that each rank's blocks are one rank's
blocks: the sign Gram is summed (integers: exact), the per-block row sums of
squares are all-gathered and added in one rank's order, the quantile's
per-row work (bracket, selection) splits by rows over the all-gathered
values, and the per-coordinate results are all-gathered: every rank returns
the one-rank result bit for bit, its momentum included (computed on every
rank from the same aggregate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ._common import Config, option, without_rows
from ._geometry import all_finite, blocked_gram, clip_scales, int8_products, row_norms
from ._order import (RowKthAbs, Scratch, abs_block_width, chunk_width, map_sorted_columns, median_1d,
                     sorted_block_width)
from ._split import shards_of
from .base import DefenseError, DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class FedSECAConfig(Config):
    """FedSECA."""

    gamma: float = option(0.9, check=lambda v: 0 <= v < 1, rule="must be in [0, 1)",
                          doc="sparsification: keep each client's top 1 - gamma coordinates by magnitude")
    momentum: bool = option(False, doc="server momentum on the aggregate")
    beta: float = option(0.5, check=lambda v: 0 <= v < 1, rule="must be in [0, 1)", doc="momentum decay")


def concordance_ratio(concord: torch.Tensor) -> torch.Tensor:
    """``rho_k`` of Eq. 5 from the sign-concordance Gram matrix (float64, CPU)."""
    return torch.sign(concord).mean(1).clamp_min(0.0)


class FedSECA:
    """FedSECA: concordance-weighted sign election, then the sign-aligned mean of clipped, clamped, sparsified updates."""

    name = "fedseca"

    def __init__(self, config: FedSECAConfig) -> None:
        self.config = config

    @property
    def sequential(self) -> bool:
        """With momentum the rule keeps state across rounds (see :func:`._split.sequential`)."""
        return self.config.momentum

    def min_clients(self, f: int) -> int:
        return 1

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, d = check_updates(updates)
        dev, dt = updates.device, updates.dtype
        gamma = self.config.gamma

        def visit(block: torch.Tensor, ws: Scratch):
            # Same pass as the sign Gram: row sums of squares and the quantile bracket.
            a = torch.abs(block, out=ws("abs", *block.shape))
            sq = torch.mul(a, a, out=ws("square", *block.shape)).sum(1).double()
            return sq, None if quantile is None else quantile.observe(a, ws)

        int8 = int8_products(n, updates.device)

        def sign(block: torch.Tensor, ws: Scratch) -> torch.Tensor:
            s = torch.sign(block, out=ws("sign", *block.shape))
            return s.to(torch.int8) if int8 else s

        # This rank's columns: whole blocks of each pass (see the docstring).
        width, width2 = abs_block_width(n), sorted_block_width(n)
        sh = shards_of(ctx).for_columns(d, align=max(width, width2))
        quantile = RowKthAbs(updates, int(math.floor(gamma * (d - 1))) + 1, sh) if gamma > 0 else None
        s0, s1 = sh.span(d, width)
        xs = updates if sh.world_size == 1 else updates[:, s0:s1]
        blocks = [-(-(b - a) // width) for a, b in sh.spans(d, width)]
        concord, seen = blocked_gram(xs, sign, visit)
        concord = sh.all_reduce_sum(concord)
        block_sqs = [block_sq for block_sq, _ in seen]
        if sh.world_size > 1:
            block_sqs = list(sh.gather(torch.stack(block_sqs), blocks).unbind(0))
        sq = torch.zeros(n, dtype=torch.float64, device=dev)
        for block_sq in block_sqs:
            sq += block_sq
        if quantile is not None:
            for _, part in seen:
                quantile.absorb(part)
        norms = sq.sqrt().cpu()
        odd = torch.nonzero(~torch.isfinite(norms)).flatten()
        if odd.numel():
            # A norm that is not finite: the row holds NaN/Inf (left out, the rest
            # aggregated with f lowered), or its squares overflow (norm redone scaled).
            exact, finite = row_norms(updates.index_select(0, odd.to(dev)))
            if not bool(finite.all()):
                bad = torch.zeros(n, dtype=torch.bool)
                bad[odd[~finite]] = True
                return without_rows(self.name, updates, ctx, bad, self)
            norms[odd] = exact
        if quantile is not None:
            quantile.share(blocks)
        rho = concordance_ratio(concord)
        rho_dev = rho.to(dev, dt)
        clip = clip_scales(norms, median_1d(norms)).to(dev, dt)
        tau = None if quantile is None else quantile.result()[:, None]
        s0, s1 = sh.span(d, width2)
        xs = updates if sh.world_size == 1 else updates[:, s0:s1]
        out = torch.empty(s1 - s0, dtype=dt, device=dev)
        elected = torch.empty(s1 - s0, dtype=torch.int8, device=dev)
        lo, hi = (n - 1) // 2, n // 2

        bar = tau if tau is not None else torch.zeros(n, 1, dtype=dt, device=dev)

        step = chunk_width(n, dev)

        def fn(r: Sequence[torch.Tensor], cols: slice, ws: Scratch) -> None:
            median = r[lo] if lo == hi else torch.add(r[lo], r[hi]).mul_(0.5)
            # Chunk by chunk of the block: small temporaries (see chunk_width).
            for c0 in range(0, cols.stop - cols.start, step):
                c1 = min(cols.stop - cols.start, c0 + step)
                here = slice(cols.start + c0, cols.start + c1)
                mu, raw = median[c0:c1], xs[:, here]
                sign = torch.sign(rho_dev @ torch.sign(raw, out=ws("sign", *raw.shape)))
                elected[here] = sign
                # t = x * s: positive where x agrees with the elected sign, and then |x|,
                # so "kept (|x| > tau) and aligned" is t > tau (tau >= 0).
                t = torch.mul(raw, sign, out=ws("aligned", *raw.shape))
                mask = torch.gt(t, bar, out=ws("mask", *raw.shape))
                # The aligned clipped value clamped to the median magnitude is
                # min(t * clip, mu) (= s * clamp(x * clip, -mu, mu), sign flips are exact);
                # the mean runs over the nonzero ones.
                vals = torch.minimum(t.mul_(clip[:, None]), mu, out=t).mul_(mask)
                total = vals.sum(0).mul_(sign)
                torch.div(total, torch.gt(vals, 0.0, out=mask).sum(0).clamp_min_(1.0), out=out[here])

        map_sorted_columns(xs, fn, scale=clip, absolute=True, need=(lo, hi))
        if sh.world_size > 1:
            out, elected = sh.gather_columns(out, d, width2), sh.gather_columns(elected, d, width2)
        if not all_finite(out):
            raise DefenseError(f"{self.name}: the aggregate is not finite")
        delta = out
        if self.config.momentum:
            prev = ctx.state.get("momentum")
            if isinstance(prev, torch.Tensor) and prev.numel() == d:
                delta = prev.to(dev, dt) * self.config.beta + out * (1.0 - self.config.beta)
            ctx.state["momentum"] = delta.detach().clone()
        accepted = (rho > 0).to(dev)
        return DefenseResult(delta=delta, accepted=accepted,
                             diagnostics={"concordance": rho.to(dt), "elected_sign": elected,
                                          "n_accepted": int(accepted.sum())})
