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

The Gram matrix comes from :func:`._geometry.frame`: for the Euclidean rules a
*centred* frame (exact picks in float32 when the updates share a large common
part; the origin is added as a point when clipping needs norms), for cosine
the plain one. Either way no entry overflows, whatever the updates hold.

Updates holding NaN or Inf (refused at the server's edge, but the rules are
also used directly) are Byzantine: the rule runs on the other rows with ``f``
lowered by their number (a requirement such as ``n >= 2f + 3`` that held still
holds), reports them not accepted with weight 0 and score +inf (listed in
``diagnostics["nonfinite"]``), and keeps them out of the reduction (a zero
weight times NaN is NaN, so weighted means take only the rows that carry
weight). Layerwise, this happens per layer.

Among aggregation ranks (``ctx.shards``): the Gram matrix is summed from the
ranks' column spans (:func:`._split.split_frame`), the selection runs on every
rank on the same summed matrix (the ``n x n`` work is tiny; RFA's Weiszfeld
loop included), and the reduction runs on column spans, all-gathered.
Layerwise, the layers are shared out among the ranks instead
(:func:`.layerwise.run_layerwise`). Against one rank only the Gram sums'
order differs: the same selection barring near-ties, weights that depend on
distances (RFA, median clipping) equal to float rounding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ._common import Config, excluded_f, no_finite_rows, option, restrict_context
from ._geometry import DISTANCES, Geometry, clip_scales
from ._order import median_1d, sorted_block_width
from ._split import into_columns, shards_of, split_frame
from .layerwise import run_layerwise
from .base import DefenseError, DefenseResult, RoundContext, check_updates

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

    def min_clients(self, f: int) -> int:
        """The fewest updates this rule can aggregate with ``f`` Byzantine ones."""
        return 1

    def centred(self) -> bool:
        """Whether the rule only reads translation-invariant quantities of the
        unscaled rows (Euclidean distances): then the frame is centred."""
        return getattr(self.config, "distance", "euclidean") == "euclidean"

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
        centred = self.centred()
        shards = shards_of(ctx)
        fr = split_frame(updates, shards, centre=centred, origin=centred and clip is not None)
        keep = excluded = None
        if not fr.all_finite:
            # Defense in depth (the server refuses NaN/Inf, but rules are also
            # used directly): such rows are Byzantine; the rule runs on the rest.
            keep = torch.nonzero(fr.finite).flatten()
            excluded = torch.nonzero(~fr.finite).flatten()
            if keep.numel() == 0:
                raise no_finite_rows(self.name, n)
            f = excluded_f(f, excluded.numel())
            try:
                self.check(int(keep.numel()), f)
            except DefenseError as exc:
                raise DefenseError(f"{exc} (after leaving out {excluded.numel()} update(s) holding NaN or Inf)") from None
            fr = fr.restrict(keep)
            ctx = restrict_context(ctx, keep, f)
        radius = scale = None
        if clip is not None:
            radius = median_1d(fr.sq_norms().sqrt())
            if clip == "median":
                scale = clip_scales(fr.sq_norms().sqrt(), radius)
        sel = self.select(Geometry(fr, scale), ctx, f)
        if keep is not None:
            sel = self._expand(sel, keep, n)
            if scale is not None:
                scale = torch.ones(n, dtype=torch.float64).index_copy_(0, keep, scale)
        if out is None:
            out = torch.empty(d, dtype=updates.dtype, device=updates.device)
        # A coordinate-wise reduction splits on its blocks (see _order.sorted_block_width).
        align = 1 if sel.weights is not None else sorted_block_width(int(sel.rows.numel()))
        into_columns(updates, shards, lambda x, o: self._reduce(x, sel, scale, f, o, all_finite=keep is None), out,
                     align=align)
        if clip == "median-output":
            norm = float(out.norm())
            if norm > float(radius):
                out.mul_(float(radius) / norm)
        diag: dict[str, Any] = dict(sel.info)
        if sel.scores is not None:
            diag["scores"] = sel.scores.to(updates.dtype)
        diag["selected"] = torch.nonzero(sel.accepted).flatten()
        diag["n_accepted"] = int(sel.accepted.sum())
        if excluded is not None:
            diag["nonfinite"] = excluded
        weights = None if sel.weights is None else sel.weights.to(updates.device, updates.dtype)
        return DefenseResult(delta=out, accepted=sel.accepted.to(updates.device), weights=weights, diagnostics=diag)

    # Selection info entries holding row indices (mapped back after exclusions).
    index_info: tuple[str, ...] = ()

    def _expand(self, sel: Selection, keep: torch.Tensor, n: int) -> Selection:
        """A selection over the rows ``keep`` as one over all ``n`` rows."""
        accepted = torch.zeros(n, dtype=torch.bool).index_copy_(0, keep, sel.accepted.to("cpu", torch.bool))
        weights = None if sel.weights is None else \
            torch.zeros(n, dtype=torch.float64).index_copy_(0, keep, sel.weights.to("cpu", torch.float64))
        rows = None if sel.rows is None else keep[sel.rows.cpu()]
        scores = None if sel.scores is None else \
            torch.full((n,), float("inf"), dtype=torch.float64).index_copy_(0, keep, sel.scores.to("cpu", torch.float64))
        info = dict(sel.info)
        for key in self.index_info:
            if isinstance(info.get(key), torch.Tensor):
                info[key] = keep[info[key].cpu()]
        return Selection(accepted=accepted, weights=weights, rows=rows, scores=scores, info=info)

    def _reduce(self, x: torch.Tensor, sel: Selection, scale: Optional[torch.Tensor], f: int,
                out: torch.Tensor, all_finite: bool = True) -> None:
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
        elif all_finite:
            # A zero weight times a finite value is 0, however large the value.
            torch.mv(x.T, w.to(x.device, x.dtype), out=out)
        else:
            # 0 x NaN is NaN: only the rows that carry weight enter the product.
            torch.mv(x.index_select(0, nz.to(x.device)).T, w[nz].to(x.device, x.dtype), out=out)


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
