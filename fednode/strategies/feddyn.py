"""FedDyn: dynamic regularisation with a per-node linear correction ``h_i``.

Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021
(eq. (3) of the plugin paper, which writes the linear term with the opposite
sign convention). Node ``i`` minimises

    L_i(w) - <h_i, w> + alpha/2 ||w - w_g||^2,

i.e. adds ``-h_i + alpha (w - w_g)`` to each mini-batch gradient, and after local
training updates ``h_i <- h_i - alpha (w_i - w_g)``. The node reports the plain
``w_i - w_g``. The server keeps its own ``h`` and moves the global model to
``mean(w_i) - h / alpha``: server step ``feddyn`` (``orchestrator.server_step``),
which must use the same ``alpha``.

State: ``state["feddyn_h"]``, float32 ``[d]`` in layout order, zero on buffers;
a new node starts from zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import as_float
from .base import LocalRound, LocalStrategy, ensure_grad

STATE_KEY = "feddyn_h"


@dataclass(frozen=True, kw_only=True)
class FedDynConfig:
    alpha: float = 0.01
    """Regularisation strength (> 0); the server step needs the same value."""

    def __post_init__(self) -> None:
        as_float(self, "alpha", low=0.0, low_open=True)


class FedDyn(LocalStrategy):
    name = "feddyn"
    server_step = "feddyn"
    stateful = True

    def begin_round(self, rnd: LocalRound) -> None:
        rnd.load_state(STATE_KEY)

    def add_gradient_terms(self, rnd: LocalRound) -> None:
        alpha = self.config.alpha
        with torch.no_grad():
            for p, g, h in zip(rnd.params, rnd.global_params, rnd.scratch[STATE_KEY + "_views"]):
                ensure_grad(p).sub_(h).add_(p - g, alpha=alpha)

    def end_round(self, rnd: LocalRound, local_vec: torch.Tensor) -> torch.Tensor:
        drift = (local_vec - rnd.global_vec) * rnd.param_mask
        rnd.state[STATE_KEY] = rnd.scratch[STATE_KEY] - self.config.alpha * drift
        return local_vec
