"""Attacks built from the benign mean and std: ALIE and IPM.

Both read the benign updates the node may know (:func:`reference_stats`: the
honest updates when omniscient, else its colluders' benign deltas) and every
colluder computes the same row, so the group uploads ``f`` identical updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_number, mean_std, reference_stats

_P_EPS = 1e-4  # keeps Phi^-1 finite when the formula's probability leaves (0, 1)


def alie_default_z(n: int, f: int) -> float:
    """ALIE's z from ``n`` and ``f`` (Baruch et al. 2019, Sec. 4):
    ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)``.

    When ``f`` is a majority the probability reaches 1; it is clamped to
    ``[1e-4, 1 - 1e-4]`` so ``z`` stays finite (|z| <= 3.72).
    """
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, _P_EPS), 1.0 - _P_EPS)
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def alie_row(rows: Tensor, z: float) -> Tensor:
    """``mean + z * std`` per coordinate of ``rows``."""
    mu, sigma = mean_std(rows.float())
    return mu + z * sigma


def ipm_row(rows: Tensor, epsilon: float) -> Tensor:
    """``-epsilon * mean(rows)``."""
    return -epsilon * rows.float().mean(dim=0)


@dataclass(frozen=True, kw_only=True)
class AlieConfig:
    """z: fixed number of standard deviations (None: from n and f, see alie_default_z)."""

    z: float | None = None

    def __post_init__(self) -> None:
        check_number(self, "z", optional=True)


class Alie(UpdateAttackBase):
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019): send
    ``mu + z * sigma`` per coordinate, with ``mu``/``sigma`` the benign mean/std, small
    enough to stay inside the benign spread (so median/trimmed-mean/Krum keep it)
    yet shifting every coordinate the same way. Needs colluders (or omniscience)."""

    name = "alie"
    needs = "colluders"

    def __init__(self, config: AlieConfig) -> None:
        super().__init__(config)

    def z(self, ctx: AttackContext) -> float:
        return self.config.z if self.config.z is not None else alie_default_z(ctx.n, ctx.f)

    def _craft(self, ctx: AttackContext) -> Tensor:
        return alie_row(reference_stats(ctx), self.z(ctx))


@dataclass(frozen=True, kw_only=True)
class IpmConfig:
    """epsilon: how far past the origin the mean is reflected (> 0)."""

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        check_number(self, "epsilon", lo=0.0, lo_open=True)


class Ipm(UpdateAttackBase):
    """Inner Product Manipulation (Xie, Koyejo & Gupta, UAI 2020): send
    ``-epsilon * mu`` with ``mu`` the benign mean, so the aggregate's inner product
    with the honest direction turns negative (small epsilon defeats median/Krum,
    large epsilon defeats the mean). Needs colluders (or omniscience)."""

    name = "ipm"
    needs = "colluders"

    def __init__(self, config: IpmConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        return ipm_row(reference_stats(ctx), self.config.epsilon)
