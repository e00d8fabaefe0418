"""AGR-agnostic attacks of Shejwalkar & Houmansadr (NDSS 2021), "Manipulating the
Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated Learning".

The crafted update is ``mu + γ p`` with ``mu`` the benign mean and ``p`` a
perturbation pointing against the honest direction (``-mu/||mu||``, ``-std`` or
``-sign(mu)``); γ is the largest value for which

* min-max: ``max_i ||crafted - x_i|| <= max_{i,j} ||x_i - x_j||``;
* min-sum: ``sum_i ||crafted - x_i||^2 <= max_i sum_j ||x_i - x_j||^2``;

over the benign updates ``x_i`` the node knows. The paper finds γ by a halving
search; each ``||mu + γp - x_i||^2`` is a quadratic ``a γ^2 + 2 b_i γ + c_i`` in γ,
so here γ is the exact largest root of the constraint (one vectorised solve, no
iterations, same answer to within the search's tolerance). γ = 0 is always
feasible (the mean lies in the benign convex hull).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_choice, mean_std, reference_stats

Perturbation = Literal["unit_vec", "std", "sign"]
PERTURBATIONS: tuple[str, ...] = ("unit_vec", "std", "sign")
_SHRINK = 1.0 - 1e-6  # keep float32 rounding on the feasible side of the bound


def perturbation(mu: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The perturbation direction ``p`` (against the honest direction)."""
    if kind == "unit_vec":
        norm = mu.norm()
        return -mu / norm if norm > 0 else torch.zeros_like(mu)
    if kind == "std":
        return -sigma
    return -torch.sign(mu)


def largest_gamma(benign: Tensor, mu: Tensor, p: Tensor, objective: str) -> float:
    """Largest γ >= 0 keeping ``mu + γ p`` within the min-max / min-sum budget."""
    x = benign.double()
    m, pd = mu.double(), p.double()
    a = float(pd.dot(pd))
    if a == 0.0:
        return 0.0
    pair = torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist")  # benign distances, one Gram product
    diff = m[None] - x
    c = diff.pow(2).sum(dim=1)          # ||mu - x_i||^2
    b = diff @ pd                        # p . (mu - x_i)
    if objective == "min_max":
        budget = pair.max().pow(2)
        disc = (b.pow(2) - a * (c - budget)).clamp_min(0.0)
        gamma = ((-b + disc.sqrt()) / a).min()
    else:
        budget = pair.pow(2).sum(dim=1).max()
        h = x.shape[0]
        bb, cc = b.sum(), c.sum()
        disc = (bb.pow(2) - h * a * (cc - budget)).clamp_min(0.0)
        gamma = (-bb + disc.sqrt()) / (h * a)
    return max(float(gamma), 0.0) * _SHRINK


@dataclass(frozen=True, kw_only=True)
class MinMaxConfig:
    """perturbation: 'unit_vec' (-mu/||mu||), 'std' (-sigma) or 'sign' (-sign(mu))."""

    perturbation: str = "std"

    def __post_init__(self) -> None:
        check_choice(self, "perturbation", PERTURBATIONS)


class _Agnostic(UpdateAttackBase):
    needs = "colluders"
    objective: str

    def __init__(self, config: MinMaxConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        benign = reference_stats(ctx).float()
        mu, sigma = mean_std(benign)
        p = perturbation(mu, sigma, self.config.perturbation)
        return mu + largest_gamma(benign, mu, p, self.objective) * p


class MinMax(_Agnostic):
    """Min-Max (Shejwalkar & Houmansadr 2021): the farthest the crafted update may be
    from any benign update is the largest benign pairwise distance. Needs colluders
    (or omniscience); all colluders send the same row."""

    name = "min_max"
    objective = "min_max"


class MinSum(_Agnostic):
    """Min-Sum (Shejwalkar & Houmansadr 2021): the crafted update's sum of squared
    distances to the benign updates is at most the largest such sum of a benign
    update. Needs colluders (or omniscience); all colluders send the same row."""

    name = "min_sum"
    objective = "min_sum"
