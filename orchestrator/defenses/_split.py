"""Defense work split among aggregation ranks (``ctx.shards``, :class:`.base.Shards`).

Every rank holds the whole ``[n, d]`` matrix; what splits is the work:

* **column blocks** (:func:`by_columns`): a coordinate-wise result (median,
  trimmed mean, a weighted sum of rows, FedSECA's per-coordinate steps) is
  computed on this rank's span of columns and the spans are all-gathered into
  the ``[d]`` vector. Each column's value is computed by the same code on the
  same values as on one rank: bit-for-bit the one-rank result.
* **Gram matrices** (:func:`split_frame`): the ``n x n`` Gram matrix is a sum
  over columns, so each rank takes :func:`._geometry.frame` of its span and the
  partial matrices are summed (in rank order: the same bits on every rank, so
  every rank makes the same selection). Only the summation order differs from
  one rank (float rounding: selections agree barring near-ties, weights
  derived from distances agree to ~1e-12 relative in float64, ~1e-6 in float32).
* **layers** (:func:`.layerwise.run_layerwise`): layers go to ranks balanced by
  size and their results are gathered.

With one rank (:data:`.base.LOCAL`) each helper is the plain one-rank code.

Exactness under a common part. A centred frame is the Gram matrix relative to a
reference row, and each rank's frame may pick its own (its span's central row):
such partial matrices do not add up. Each is first moved to one reference, the
central row ``c`` of the summed squared distances ``D_ij = G_ii + G_jj - 2 G_ij``
(which do add up; least median distance, an honest majority puts an honest row
there): relative to ``c`` the Gram matrix is ``G_ij - G_ic - G_cj + G_cc``
whatever the span's own reference was, with entries of the size of the
spread times the rows' distances, as one rank's centred frame (moving through
``D`` instead would lose the cross terms of a huge row in ``|x|^2``-sized sums).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ._geometry import Frame, frame
from .base import LOCAL, Shards


def shards_of(ctx: Any) -> Shards:
    """``ctx.shards`` (:data:`LOCAL` for contexts built without it)."""
    return getattr(ctx, "shards", None) or LOCAL


def by_columns(x: torch.Tensor, shards: Shards, compute: Callable[[torch.Tensor], torch.Tensor], *,
               align: int = 1) -> torch.Tensor:
    """The ``[d]`` vector of which ``compute(x[:, span])`` gives the columns
    ``span``: this rank's span computed, the spans all-gathered. With one rank
    (or ``d`` too small to split) ``compute(x)`` itself."""
    d = x.shape[1]
    sh = shards.for_columns(d, align)
    if sh.world_size == 1:
        return compute(x)
    s0, s1 = sh.span(d, align)
    return sh.gather_columns(compute(x[:, s0:s1]), d, align)


def into_columns(x: torch.Tensor, shards: Shards, fill: Callable[[torch.Tensor, torch.Tensor], Any],
                 out: torch.Tensor, *, align: int = 1) -> torch.Tensor:
    """As :func:`by_columns` for a ``fill(x_cols, out_cols)`` that writes into
    ``out`` (a ``[d]`` tensor): with one rank ``fill(x, out)``."""
    d = x.shape[1]
    sh = shards.for_columns(d, align)
    if sh.world_size == 1:
        fill(x, out)
        return out
    s0, s1 = sh.span(d, align)
    block = torch.empty(s1 - s0, dtype=out.dtype, device=out.device)
    fill(x[:, s0:s1], block)
    return sh.gather_columns(block, d, align, out=out)


def split_frame(x: torch.Tensor, shards: Shards, *, centre: bool, origin: bool = False,
                extra: Optional[torch.Tensor] = None) -> Frame:
    """:func:`._geometry.frame` of ``x`` (same arguments) from the ranks' column
    spans (see the module docstring); the one-rank ``frame`` itself when not split."""
    n, d = x.shape
    sh = shards.for_columns(d)
    if sh.world_size == 1:
        return frame(x, centre=centre, origin=origin, extra=extra)
    s0, s1 = sh.span(d)
    part = frame(x[:, s0:s1], centre=centre, origin=origin, extra=None if extra is None else extra[:, s0:s1])
    m = part.g.shape[0]
    # One all-gather of every span's Gram matrix (and its rows holding NaN/Inf);
    # the sums are then taken here, in rank order, the same on every rank.
    mine = torch.zeros(m + 1, m, dtype=torch.float64)
    mine[:m] = part.g
    mine[m, :n] = (~part.finite).to(torch.float64)
    every = sh.gather(mine, [m + 1] * sh.world_size).view(sh.world_size, m + 1, m)
    finite = _sum(every[:, m, :n]) == 0
    grams = every[:, :m]
    if not bool(finite.all()):
        # A row holding NaN or Inf in some span is left out by the rules: its
        # entries (whatever they hold in other spans) only have to stay finite.
        keep = torch.ones(m, dtype=torch.bool)
        keep[:n] = finite
        grams = torch.where(keep[:, None] & keep[None, :], grams, torch.zeros_like(grams))
    if not centre:
        return Frame(_sum(grams), n, finite, part.extra, part.origin, centred=False)
    # The central row of the summed distances, then each span's Gram matrix
    # relative to it (whatever reference the span's frame took), summed.
    diag = grams.diagonal(dim1=1, dim2=2)
    c = _central_row(_sum(diag[:, :, None] + diag[:, None, :] - 2.0 * grams)[:n, :n], finite)
    # G_ij - G_ic - G_jc + G_cc as G_ij - (t_i + t_j): symmetric wherever G is.
    t = grams[:, :, c] - grams[:, c, c, None] * 0.5
    return Frame(_sum(grams - (t[:, :, None] + t[:, None, :])), n, finite, part.extra, part.origin, centred=True)


def _sum(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in that order."""
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc


def _central_row(dist: torch.Tensor, finite: torch.Tensor) -> int:
    """The finite row with the least median squared distance to the other finite
    rows (lowest index on ties); 0 when no row is finite."""
    idx = torch.nonzero(finite).flatten()
    k = int(idx.numel())
    if k == 0:
        return 0
    if k == 1:
        return int(idx[0])
    sub = dist[idx][:, idx].clone()
    sub.fill_diagonal_(float("inf"))
    typical = sub.sort(1).values[:, (k - 2) // 2]
    return int(idx[int(torch.sort(typical, stable=True).indices[0])])


def sequential(rule: Any) -> bool:
    """Whether ``rule`` (or a rule nested in it) keeps state across rounds or draws
    from ``ctx.generator``: its calls must then happen on every rank in the same
    order (a layerwise wrapper runs every layer on every rank instead of sharing
    them out). Rules declare it with a ``sequential`` attribute."""
    while rule is not None:
        if bool(getattr(rule, "sequential", False)):
            return True
        rule = getattr(rule, "inner", None)
    return False
