"""STPA: spatial-temporal pattern analysis (Wang et al., "Byzantine-Resilient
Federated Learning via Spatial-Temporal Pattern Analysis", Algorithm 1).

Spatial: cosine similarities ``S`` of the updates (from the Gram matrix);
complete-linkage agglomerative clustering (scipy, on the distances ``1 - S``)
into two clusters; if the largest cross-cluster similarity is below ``s_t`` the
larger cluster is kept, otherwise all updates are. A tie in size keeps all
updates (with no majority there is nothing to prefer one half by), and so
does a larger cluster too small for the inner rule's requirement with this
``f`` (e.g. under Krum's ``2f + 3``; the inner rule then tolerates ``f`` on all
updates, instead of the round failing). The kept updates go to the ``inner``
rule (default: coordinate-wise median, the paper's choice) with the same ``f``.
Updates holding NaN or Inf are left out first (``f`` lowered by their number).

Temporal: with ``delta`` the inner aggregate, ``v <- beta v + (1 - beta) delta``,
``c = cos(delta, v)``; if ``c <= 0`` the round is skipped (zero delta), else the
step is ``eta0 * c * v``. ``v`` starts at the first aggregate (an average
started at zero would shrink the first step by ``1 - beta``) and is updated
even on skipped rounds, as in Algorithm 1; it lives in ``ctx.state`` (a tensor
and a number, checkpoint-safe).

Sign convention: the paper's ``Delta w = w_t - w_bar`` is minus our delta; the
recursion and the cosine are linear and sign-symmetric, so running them on
deltas and stepping ``w + eta0 c v`` is exactly the paper's ``w - eta c v``.
No requirement beyond an honest majority; ties in the linkage follow scipy.

What to expect from ``s_t``: the split needs *every* cross-cluster cosine below
``s_t`` (0.02 by default). Early in training honest updates point the same way
and an attacker opposing them sits far below (sign flipping x4, 3 of 10 MLP
nodes on MNIST-5k: largest cross cosine -0.81 in round 0). As the model
converges the honest updates decorrelate, the largest cross cosine climbs
towards 0 and, from round 9 in that run, sometimes above ``s_t``: STPA then
keeps every update and the inner median carries the round (accuracy 0.90 in
both kinds of round). The per-round ``cross_similarity``, ``split`` and
``cosine`` land in ``metrics.jsonl`` under ``diagnostics``. With noisier
updates (5 local steps of batch 8 in ``scenarios/cross-device.toml``) this
happens earlier (round 7 there).

Among aggregation ranks (``ctx.shards``): the Gram matrix is summed from the
ranks' column spans (:func:`._split.split_frame`), the clustering runs on every
rank on the same summed matrix, the inner rule splits as it does, and the
temporal step (a few ``[d]`` vector operations) runs on every rank on the same
gathered aggregate, so ``v`` is the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Config, _inner_min, build_spec, mask_of, option, sub_context, through_mixing, without_rows
from ._geometry import Geometry, all_finite
from ._split import shards_of, split_frame
from .base import DefenseError, DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class STPAConfig(Config):
    """STPA."""

    s_t: float = option(0.02, check=lambda v: -1 <= v <= 1, rule="must be in [-1, 1]",
                        doc="split when the largest cross-cluster cosine is below this")
    beta: float = option(0.5, check=lambda v: 0 <= v < 1, rule="must be in [0, 1)", doc="momentum decay")
    eta0: float = option(1.0, check=lambda v: v > 0, rule="must be > 0", doc="step = eta0 * cos * momentum")
    inner: str | dict = option("median", doc="rule applied to the kept cluster (name or table)")


def two_clusters(sim: torch.Tensor) -> torch.Tensor:
    """Complete-linkage labels (0/1) cutting the dendrogram of ``1 - sim`` at two clusters."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    dist = (1.0 - sim).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    dist = (dist + dist.T) * 0.5
    if not bool(torch.isfinite(dist).all()):
        raise DefenseError("stpa: cosine similarities are not finite; cannot cluster")
    try:
        tree = linkage(squareform(dist.numpy(), checks=False), method="complete")
    except ValueError as exc:  # scipy's own checks: never a foreign exception out of a rule
        raise DefenseError(f"stpa: clustering failed: {exc}") from None
    return torch.from_numpy(fcluster(tree, t=2, criterion="maxclust") - 1).long()


class STPA:
    """STPA: keep the larger of two cosine clusters when they are dissimilar, aggregate it, then step along a momentum that must agree with the aggregate."""

    name = "stpa"
    sequential = True  # momentum v across rounds (see _split.sequential)

    def __init__(self, config: STPAConfig) -> None:
        self.config = config
        self.inner = build_spec(config.inner, f"{self.name}.inner")

    def min_clients(self, f: int) -> int:
        # A split that would leave the inner rule too few updates keeps them all.
        return _inner_min(self.inner, f)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, d = check_updates(updates)
        cfg = self.config
        keep = torch.arange(n)
        cross = 1.0
        if n >= 2:
            # cosine: the plain Gram matrix (overflow-safe)
            fr = split_frame(updates, shards_of(ctx), centre=False)
            if not fr.all_finite:
                # Before any state changes: the rows holding NaN/Inf are left out.
                return without_rows(self.name, updates, ctx, ~fr.finite, self)
            sim = Geometry(fr).cosine_similarity()
            labels = two_clusters(sim)
            a, b = torch.nonzero(labels == 0).flatten(), torch.nonzero(labels == 1).flatten()
            if a.numel() and b.numel():
                cross = float(sim[a][:, b].max())
                larger = a if a.numel() > b.numel() else b
                if cross < cfg.s_t and a.numel() != b.numel() and larger.numel() >= self.min_clients(int(ctx.f)):
                    keep = larger
        rows = updates if keep.numel() == n else updates.index_select(0, keep.to(updates.device))
        res = self.inner(rows, sub_context(ctx, state_key="inner", rows=None if keep.numel() == n else keep))
        agg = res.delta
        if not all_finite(agg):
            raise DefenseError("stpa: the inner rule's aggregate is not finite")
        prev = ctx.state.get("v")
        if isinstance(prev, torch.Tensor) and prev.numel() == d and all_finite(prev):
            v = prev.to(agg.device, agg.dtype) * cfg.beta + agg * (1.0 - cfg.beta)
        else:
            v = agg.clone()
        ctx.state["v"] = v.detach().clone()
        a64, v64 = agg.double(), v.double()  # no overflow in the cosine of huge aggregates
        denom = float(a64.norm()) * float(v64.norm())
        c = float(a64 @ v64) / denom if denom > 0 else 0.0
        skipped = c <= 0
        delta = torch.zeros_like(agg) if skipped else v * (cfg.eta0 * c)
        ctx.state["rounds"] = int(ctx.state.get("rounds", 0)) + 1
        select = torch.zeros(keep.numel(), n, dtype=torch.float64)
        select[torch.arange(keep.numel()), keep] = 1.0
        accepted, _ = through_mixing(res, select, n)
        diag = {"cluster_kept": mask_of(keep, n, torch.device("cpu")), "cross_similarity": cross,
                "split": keep.numel() < n, "cosine": c, "skipped": skipped, "n_accepted": int(accepted.sum())}
        # No per-client weights: the step mixes this round's aggregate with past ones.
        return DefenseResult(delta=delta, accepted=accepted.to(updates.device), diagnostics=diag)
