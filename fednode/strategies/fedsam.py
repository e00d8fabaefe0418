"""FedSAM: sharpness-aware minimisation as the local optimiser.

Qu et al., "Generalized Federated Learning via Sharpness Aware Minimization",
ICML 2022 (also Caldarola et al., ECCV 2022); SAM from Foret et al., ICLR 2021;
eq. (5) of the plugin paper. Each mini-batch: ``g = grad F_k(w)``, ascent
``e = rho * g / ||g||``, and the SGD step from ``w`` uses ``grad F_k(w + e)``.
No per-node state; server step ``sgd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import as_float
from .base import LocalRound, LocalStrategy, perturbed_gradients


@dataclass(frozen=True, kw_only=True)
class FedSAMConfig:
    rho: float = 0.05
    """Radius of the ascent step (>= 0; 0 is FedAvg with one extra gradient)."""

    def __post_init__(self) -> None:
        as_float(self, "rho", low=0.0)


class FedSAM(LocalStrategy):
    name = "fedsam"
    server_step = "sgd"

    def compute_gradients(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor) -> None:
        perturbed_gradients(self, rnd, xb, yb, rho=self.config.rho, normalize=True)
