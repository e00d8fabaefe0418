"""Bucketing, a pre-aggregator (Karimireddy, He, Jaggi, "Byzantine-Robust
Learning on Heterogeneous Datasets via Bucketing", ICLR 2022).

The rows are shuffled with a permutation drawn from ``ctx.generator`` (never the
global RNG) and averaged in buckets of ``s`` consecutive rows (the last bucket
may be smaller); the ``inner`` rule (default: median) aggregates the
``ceil(n / s)`` bucket means with the same ``f`` (each Byzantine row spoils at
most one bucket). Randomised: permuting the inputs changes the buckets, so the
output is permutation invariant in distribution only. A client is accepted
when its bucket is; its weight is its share of the output.

Among aggregation ranks (``ctx.shards``) the permutation and the bucket means
are computed on every rank (the same generator seed gives the same
permutation; the means are one ``[buckets, n] @ [n, d]`` product), and the
inner rule splits its own work.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ._common import Config, _inner_min, build_spec, option, sub_context, through_mixing, without_rows
from ._geometry import nonfinite_rows
from .base import DefenseError, DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class BucketingConfig(Config):
    """Bucketing."""

    s: int = option(2, check=lambda v: v >= 1, rule="must be >= 1", doc="updates per bucket")
    inner: str | dict = option("median", doc="rule applied to the bucket means (name or table)")


class Bucketing:
    """Bucketing: average random buckets of s updates, then apply the inner rule (default median) to the bucket means."""

    name = "bucketing"
    sequential = True  # draws from ctx.generator (see _split.sequential)

    def __init__(self, config: BucketingConfig) -> None:
        self.config = config
        self.inner = build_spec(config.inner, f"{self.name}.inner")

    def min_clients(self, f: int) -> int:
        # The inner rule sees ceil(n / s) bucket means.
        return self.config.s * (_inner_min(self.inner, f) - 1) + 1

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, _ = check_updates(updates)
        if ctx.generator is None:
            raise DefenseError("bucketing needs ctx.generator (a seeded torch.Generator) for its permutation")
        s = self.config.s
        perm = torch.randperm(n, generator=ctx.generator, device=ctx.generator.device).cpu()
        buckets = (n + s - 1) // s
        mix = torch.zeros(buckets, n, dtype=torch.float64)
        slot = torch.arange(n) // s
        sizes = torch.bincount(slot, minlength=buckets).to(torch.float64)
        mix[slot, perm] = 1.0 / sizes[slot]
        means = mix.to(updates.device, updates.dtype) @ updates
        if not bool(torch.isfinite(means.sum())):
            # 0 x NaN is NaN: one row holding NaN/Inf spoils every bucket of the
            # mixing product. (A finite sum rules that out; an overflowing one is
            # checked row by row.) Leave such rows out and bucket the rest.
            bad = nonfinite_rows(updates)
            if bad.any():
                return without_rows(self.name, updates, ctx, bad, self)
        res = self.inner(means, sub_context(ctx, state_key="inner", mixed=True))
        accepted, weights = through_mixing(res, mix, n)
        diag = dict(res.diagnostics)
        diag.update(bucket_of=torch.empty(n, dtype=torch.long).scatter_(0, perm, slot), buckets=buckets)
        return DefenseResult(delta=res.delta, accepted=accepted.to(updates.device),
                             weights=None if weights is None else weights.to(updates.device, updates.dtype),
                             diagnostics=diag)
