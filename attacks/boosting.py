"""Boosting and model replacement: the node amplifies its own (usually poisoned) delta.

Both scale the node's delta ``Δ = w_local - w_global``. The papers write the
upload as weights, ``w ← w + λ(w - w_global)`` (virtual-data plugin paper,
eqs. 9-10), whose delta is ``(1 + λ)Δ``; by default this library sends ``λΔ``
(the boosting factor applied to the delta itself). ``keep_base=True`` gives the
papers' literal weights form, ``(1 + λ)Δ``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_number


def _boosted(delta: Tensor, lam: float, keep_base: bool) -> Tensor:
    return delta * (lam + 1.0 if keep_base else lam)


@dataclass(frozen=True, kw_only=True)
class BoostConfig:
    """lam: boosting factor λ; keep_base: send (1 + λ)Δ (eq. 9 literally) instead of λΔ."""

    lam: float = 10.0
    keep_base: bool = False

    def __post_init__(self) -> None:
        check_number(self, "lam")
        if not isinstance(self.keep_base, bool):
            raise ValueError(f"keep_base={self.keep_base!r}: must be a bool")


class Boost(UpdateAttackBase):
    """Boosted update ``λΔ`` (virtual-data consistency plugin paper, eqs. 9-10; Bhagoji
    et al. 2019 "explicit boosting"). Needs its own delta."""

    name = "boost"
    needs = "own"

    def __init__(self, config: BoostConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        return _boosted(ctx.own, self.config.lam, self.config.keep_base)


@dataclass(frozen=True, kw_only=True)
class ModelReplacementConfig:
    """p: adversarial clients in the round (None: ctx.f, at least 1); n: clients
    aggregated (None: ctx.n); keep_base: send (1 + λ)Δ = (n / p)Δ instead of λΔ."""

    p: int | None = None
    n: int | None = None
    keep_base: bool = False

    def __post_init__(self) -> None:
        check_number(self, "p", lo=1, integer=True, optional=True)
        check_number(self, "n", lo=1, integer=True, optional=True)
        if self.p is not None and self.n is not None and self.p > self.n:
            raise ValueError(f"p={self.p}: must be <= n={self.n}")
        if not isinstance(self.keep_base, bool):
            raise ValueError(f"keep_base={self.keep_base!r}: must be a bool")


class ModelReplacement(UpdateAttackBase):
    """Model replacement (Bagdasaryan et al. 2020, as used with label flipping in the
    Layerwise Cosine Aggregation paper, eq. 3): scale the delta by ``λ = (n - p) / p``
    where ``n`` is the number of aggregated clients and ``p`` the number of
    adversarial clients, so the ``p`` adversaries together outweigh the ``n - p``
    benign ones under a plain mean. With ``keep_base`` the factor is ``1 + λ = n / p``:
    if benign deltas have converged (≈ 0), FedAvg's new global model is then the
    adversaries' model exactly. Needs its own delta."""

    name = "model_replacement"
    needs = "own"

    def __init__(self, config: ModelReplacementConfig) -> None:
        super().__init__(config)

    def factor(self, ctx: AttackContext) -> float:
        """The boosting factor λ for this round."""
        n = self.config.n if self.config.n is not None else ctx.n
        p = self.config.p if self.config.p is not None else max(ctx.f, 1)
        if p > n:
            raise ValueError(f"model_replacement: p={p} exceeds n={n}")
        return (n - p) / p

    def _craft(self, ctx: AttackContext) -> Tensor:
        return _boosted(ctx.own, self.factor(ctx), self.config.keep_base)
