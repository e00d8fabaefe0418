"""FedSpeed: prox-correction plus a perturbed (quasi-) gradient.

Sun et al., "FedSpeed: Larger Local Interval, Less Communication Round, and
Higher Generalization Accuracy", ICLR 2023, Algorithm 1; eq. (6) of the plugin
paper. Per mini-batch, from the local weights ``w``:

    g1 = grad F_k(w);   w' = w + rho * g1;   g2 = grad F_k(w')     (same batch)
    g~ = (1 - alpha) g1 + alpha g2                                  (quasi-gradient)
    w  <- w - eta (g~ - g^_i + (w - w_g) / lambda)                  (eq. 6)

After the local interval (final weights ``w_K``) the node updates its
prox-correction term and reports a corrected local model:

    g^_i <- g^_i - (w_K - w_g) / lambda
    w_i   = w_K - lambda * g^_i

so the delta sent is ``w_i - w_g``. The ascent step is not normalised (as in the
paper's Algorithm 1; FedSAM's is). The server averages the ``w_i`` (server step
``sgd``).

State: ``state["fedspeed_ghat"]`` (``g^_i``), float32 ``[d]``, zero on buffers;
a new node starts from zeros.

The hyper-parameter ``lambda`` is a Python keyword, so the config field is
``lam``; :func:`fednode.strategies.build_strategy` accepts ``lambda`` as its alias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._validate import as_float
from .base import LocalRound, LocalStrategy, ensure_grad, perturbed_gradients

STATE_KEY = "fedspeed_ghat"


@dataclass(frozen=True, kw_only=True)
class FedSpeedConfig:
    ALIASES: ClassVar[dict[str, str]] = {"lambda": "lam"}

    lam: float = 10.0
    """``lambda`` (> 0): the prox term is ``(w - w_g) / lambda`` (default coefficient 0.1)."""
    rho: float = 0.1
    """Step of the (unnormalised) gradient-ascent perturbation (>= 0)."""
    alpha: float = 1.0
    """Weight of the perturbed gradient in the quasi-gradient, in [0, 1]."""

    def __post_init__(self) -> None:
        as_float(self, "lam", low=0.0, low_open=True)
        as_float(self, "rho", low=0.0)
        as_float(self, "alpha", low=0.0, high=1.0)


class FedSpeed(LocalStrategy):
    name = "fedspeed"
    server_step = "sgd"
    stateful = True

    def begin_round(self, rnd: LocalRound) -> None:
        rnd.load_state(STATE_KEY)

    def compute_gradients(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor) -> None:
        perturbed_gradients(self, rnd, xb, yb, rho=self.config.rho, normalize=False, mix=self.config.alpha)

    def add_gradient_terms(self, rnd: LocalRound) -> None:
        inv_lam = 1.0 / self.config.lam
        with torch.no_grad():
            for p, g, ghat in zip(rnd.params, rnd.global_params, rnd.scratch[STATE_KEY + "_views"]):
                ensure_grad(p).sub_(ghat).add_(p - g, alpha=inv_lam)

    def end_round(self, rnd: LocalRound, local_vec: torch.Tensor) -> torch.Tensor:
        lam = self.config.lam
        ghat = rnd.scratch[STATE_KEY] - ((local_vec - rnd.global_vec) * rnd.param_mask) / lam
        rnd.state[STATE_KEY] = ghat
        return local_vec - lam * ghat
