"""Simple transforms of the node's own delta: sign flipping and scaling."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_number


@dataclass(frozen=True, kw_only=True)
class SignFlipConfig:
    """scale: magnitude multiplier applied after negation (> 0)."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        check_number(self, "scale", lo=0.0, lo_open=True)


class SignFlip(UpdateAttackBase):
    """Sign flipping: send ``-scale * Δ`` (the node moves the model against its own
    honest direction; Damaskinos et al. 2018, Allen-Zhu et al. 2020). Needs its own delta."""

    name = "sign_flip"
    needs = "own"

    def __init__(self, config: SignFlipConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        return -self.config.scale * ctx.own


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """factor: multiplier s applied to the own delta."""

    factor: float = 10.0

    def __post_init__(self) -> None:
        check_number(self, "factor")


class Scaling(UpdateAttackBase):
    """Scaling: send ``s * Δ``. Needs its own delta."""

    name = "scaling"
    needs = "own"

    def __init__(self, config: ScalingConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        return self.config.factor * ctx.own
