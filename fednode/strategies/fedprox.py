"""FedProx: local objective ``F_k(w) + mu/2 ||w - w_g||^2``.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020;
eq. (2) of the plugin paper. The proximal gradient ``mu (w - w_g)`` is added to
the data gradient of each mini-batch (trainable parameters only). ``mu = 0`` is
FedAvg. No per-node state; server step ``sgd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import as_float
from .base import LocalRound, LocalStrategy, ensure_grad


@dataclass(frozen=True, kw_only=True)
class FedProxConfig:
    mu: float = 0.01
    """Proximal coefficient (>= 0)."""

    def __post_init__(self) -> None:
        as_float(self, "mu", low=0.0)


class FedProx(LocalStrategy):
    name = "fedprox"
    server_step = "sgd"

    def add_gradient_terms(self, rnd: LocalRound) -> None:
        mu = self.config.mu
        with torch.no_grad():
            for p, g in zip(rnd.params, rnd.global_params):
                ensure_grad(p).add_(p - g, alpha=mu)
