"""Distance-based rules as selection over a Gram matrix plus a reduction.

A :class:`GramRule` sees each group of columns (the whole vector, or one layer
when ``layerwise``) only through its Gram matrix: it *selects* (returns indices
or weights, and scores) from the :class:`~._geometry.Geometry`, and the shared
code *reduces* the selected rows to a vector. The three options of Layerwise
Cosine Aggregation (Garcia-Marquez et al., arXiv:2503.21244) live here, once,
for every rule built on this class (Krum, Multi-Krum, Bulyan, GeoMed, RFA):

``layerwise``
    Run the rule independently on each layer's column slice and concatenate
    (the paper's ``A^L``). A layer is one entry of the layout: every parameter
    tensor *and* every floating-point buffer (BatchNorm running mean/var). The
    buffers count as layers of their own because their deltas live on a
    different scale from any weight (the paper reports BatchNorm statistics as
    the place high-norm updates break EfficientNet); merged into a weight
    layer they would either dominate or vanish in its distances.
``distance``
    ``"euclidean"`` (squared, as Krum scores) or ``"cosine"`` (``1 - cos``,
    zero-norm safe). Every distance comes from the same Gram matrix. Cosine
    ignores magnitude: unclipped, a huge update pointing the honest way is
    as close as an honest one (the paper always pairs it with ``clip``).
``clip``
    ``"median"``: clip each input row (each layer slice when layerwise) to the
    median norm of the round's rows before the rule, the paper's text ("median
    gradient clipping as a preprocessing step"); distances and the reduction
    both use the clipped rows, obtained by rescaling the Gram matrix (no copy).
    ``"median-output"``: leave the inputs alone and clip the aggregate (per
    layer when layerwise) to that median norm, as the paper's reference code
    does. ``None``: no clipping.

The paper's four variants are configurations of one rule, e.g. for Krum:
original ``{}``, layerwise ``{layerwise = true}``, cosine with median clipping
``{distance = "cosine", clip = "median"}``, layerwise cosine ``{layerwise =
true, distance = "cosine", clip = "median"}``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ._common import Config, option
from ._geometry import DISTANCES, Geometry, clip_scales, gram
from ._order import median_1d
from .layerwise import run_layerwise
from .base import DefenseResult, RoundContext, check_updates

CLIPS = (None, "median", "median-output")


@dataclass(frozen=True, kw_only=True)
class DistanceOptions(Config):
    """The Layerwise Cosine Aggregation options shared by the distance-based rules."""

    layerwise: bool = option(False, doc="run the rule on each layer (layout entry, buffers included) separately")
    distance: str = option("euclidean", *DISTANCES, doc="squared Euclidean or 1 - cos, both from one Gram matrix")
    clip: str | None = option(None, *CLIPS, doc="clip inputs (or the output) to the round's median norm")


@dataclass
class Selection:
    """What a rule chose in one column group; ``weights`` (sum 1) for a weighted
    mean of the rows, or ``rows`` for a coordinate-wise reduction."""

    accepted: torch.Tensor
    weights: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    info: dict[str, Any] = field(default_factory=dict)


class GramRule:
    """Base of the rules that select from pairwise geometry; subclasses define
    :meth:`check` (requirements), :meth:`select`, and :meth:`reduce_rows` if they
    reduce coordinate-wise."""

    name = "rule"
    writes_into = True  # accepts ``out=`` (a [d] view to reduce into), see layerwise.run_layerwise

    def __init__(self, config: Any) -> None:
        self.config = config

    def check(self, n: int, f: int) -> None:
        pass

    def select(self, geom: Geometry, ctx: RoundContext, f: int) -> Selection:
        raise NotImplementedError

    def reduce_rows(self, x: torch.Tensor, rows: torch.Tensor, scale: Optional[torch.Tensor], f: int,
                    out: torch.Tensor) -> None:
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, ctx: RoundContext, out: Optional[torch.Tensor] = None) -> DefenseResult:
        n, d = check_updates(updates)
        f = int(ctx.f)
        self.check(n, f)
        cfg = self.config
        if getattr(cfg, "layerwise", False):
            flat = type(self)(dataclasses.replace(cfg, layerwise=False))
            res = run_layerwise(flat, updates, ctx)
            if out is not None:
                res.delta = out.copy_(res.delta)
            return res
        clip = getattr(cfg, "clip", None)
        g = gram(updates)
        norms = g.diagonal().clamp_min(0).sqrt()
        radius = median_1d(norms) if clip is not None else None
        scale = clip_scales(norms, radius) if clip == "median" else None
        sel = self.select(Geometry(g, scale), ctx, f)
        if out is None:
            out = torch.empty(d, dtype=updates.dtype, device=updates.device)
        self._reduce(updates, sel, scale, f, out)
        if clip == "median-output":
            norm = float(out.norm())
            if norm > float(radius):
                out.mul_(float(radius) / norm)
        diag: dict[str, Any] = dict(sel.info)
        if sel.scores is not None:
            diag["scores"] = sel.scores.to(updates.dtype)
        diag["selected"] = torch.nonzero(sel.accepted).flatten()
        diag["n_accepted"] = int(sel.accepted.sum())
        weights = None if sel.weights is None else sel.weights.to(updates.device, updates.dtype)
        return DefenseResult(delta=out, accepted=sel.accepted.to(updates.device), weights=weights, diagnostics=diag)

    def _reduce(self, x: torch.Tensor, sel: Selection, scale: Optional[torch.Tensor], f: int,
                out: torch.Tensor) -> None:
        if sel.weights is None:
            rows = sel.rows.to(x.device)
            self.reduce_rows(x, rows, None if scale is None else scale[sel.rows].to(x.device, x.dtype), f, out)
            return
        w = sel.weights if scale is None else sel.weights * scale
        nz = torch.nonzero(w).flatten()
        if nz.numel() == 1:
            # Krum's pick: one row copy instead of a pass over all n rows.
            i = int(nz[0])
            torch.mul(x[i], float(w[i]), out=out)
        else:
            torch.mv(x.T, w.to(x.device, x.dtype), out=out)


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: sum of its ``n - f - 2`` smallest distances to the others
    (at least one neighbour, so the score stays defined on the small sets Bulyan
    reaches in its last iterations)."""
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=dist.dtype)
    k = min(max(n - f - 2, 1), n - 1)
    off = dist.clone()
    off.fill_diagonal_(float("inf"))
    return torch.topk(off, k, dim=1, largest=False).values.sum(1)
