"""Noise attacks: random updates drawn with the node's seeded generator."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_number, randn


@dataclass(frozen=True, kw_only=True)
class UntargetedConfig:
    """tau: scaling factor τ of the noise model."""

    tau: float = 10.0

    def __post_init__(self) -> None:
        check_number(self, "tau")


class Untargeted(UpdateAttackBase):
    """Untargeted model poisoning (virtual-data consistency plugin paper, eqs. 11-12):
    upload ``τ(w' - w_global)`` with ``w' ~ N(0, I)``. The paper's right-hand side is
    sent as the delta. Needs ``ctx.global_weights``."""

    name = "untargeted"
    needs = "nothing"
    requires = ("global_weights",)

    def __init__(self, config: UntargetedConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        w = ctx.global_weights
        w_prime = randn((w.shape[0],), ctx.generator, w.device)
        return self.config.tau * (w_prime - w.float())


@dataclass(frozen=True, kw_only=True)
class GaussianConfig:
    """mu, sigma: mean and standard deviation of the noise."""

    mu: float = 0.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        check_number(self, "mu")
        check_number(self, "sigma", lo=0.0)


class Gaussian(UpdateAttackBase):
    """Plain Gaussian noise ``N(mu, sigma^2 I)`` as the delta (Blanchard et al. 2017's
    Gaussian Byzantine worker). Needs only the model size ``d``."""

    name = "gaussian"
    needs = "nothing"

    def __init__(self, config: GaussianConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        return self.config.mu + self.config.sigma * randn((ctx.dim,), ctx.generator, ctx.device)


@dataclass(frozen=True, kw_only=True)
class LayerGaussianConfig:
    """layer: index into ctx.slices of the layer to replace (negative counts from
    the end; None: the largest layer, the first one on ties)."""

    layer: int | None = None

    def __post_init__(self) -> None:
        check_number(self, "layer", integer=True, optional=True)


class LayerGaussian(UpdateAttackBase):
    """Replace ONE layer of the own delta with Gaussian noise of that layer's own mean
    and std (unbiased; 0 for a one-element layer); every other coordinate is the own
    delta unchanged. A layer-targeted attack that per-layer statistics can hide.
    Needs its own delta and ``ctx.slices``."""

    name = "layer_gaussian"
    needs = "own"
    requires = ("slices",)

    def __init__(self, config: LayerGaussianConfig) -> None:
        super().__init__(config)

    def chosen_slice(self, slices: list[slice]) -> slice:
        if not slices:
            raise ValueError("layer_gaussian: ctx.slices is empty")
        idx = self.config.layer
        if idx is None:
            sizes = [sl.stop - sl.start for sl in slices]
            idx = sizes.index(max(sizes))
        if not -len(slices) <= idx < len(slices):
            raise ValueError(f"layer={idx}: out of range for {len(slices)} layers")
        return slices[idx]

    def _craft(self, ctx: AttackContext) -> Tensor:
        sl = self.chosen_slice(ctx.slices)
        out = ctx.own.float().clone()
        part = out[sl]
        if part.numel() == 0:
            return out
        mean = part.mean()
        std = part.std(correction=1) if part.numel() > 1 else part.new_zeros(())
        out[sl] = mean + std * randn((part.numel(),), ctx.generator, out.device)
        return out
