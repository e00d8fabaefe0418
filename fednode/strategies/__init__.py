"""Local-training strategy registry: ``{name: (ConfigClass, StrategyClass)}``.

``build_strategy(name, params)`` returns a configured strategy whose
``train(...)`` runs the shared loop of :class:`~fednode.strategies.base.LocalStrategy`.
An unknown name lists the known ones; an unknown parameter is an error naming
it and the allowed ones. Each strategy class names the server step it needs
(``server_step``: ``"sgd"`` or ``"feddyn"``, see ``orchestrator.server_step``)
and whether the node must keep per-node state (``stateful``).

| name       | params (defaults)                         | state key        | server step |
|------------|-------------------------------------------|------------------|-------------|
| fedavg     | —                                         | —                | sgd         |
| fedprox    | mu=0.01                                   | —                | sgd         |
| feddyn     | alpha=0.01                                | ``feddyn_h``     | feddyn      |
| fedrs      | alpha=0.5                                 | —                | sgd         |
| fedsam     | rho=0.05                                  | —                | sgd         |
| fedspeed   | lam (alias ``lambda``)=10, rho=0.1, alpha=1.0 | ``fedspeed_ghat`` | sgd     |
"""
from __future__ import annotations

from typing import Any

from proto.registry import Registry

from .base import LocalRound, LocalStrategy, perturbed_gradients
from .fedavg import FedAvg, FedAvgConfig
from .feddyn import FedDyn, FedDynConfig
from .fedprox import FedProx, FedProxConfig
from .fedrs import FedRS, FedRSConfig, restricted_logits
from .fedsam import FedSAM, FedSAMConfig
from .fedspeed import FedSpeed, FedSpeedConfig

STRATEGIES: Registry = Registry("algorithm", error=ValueError, entries={
    "fedavg": (FedAvgConfig, FedAvg),
    "fedprox": (FedProxConfig, FedProx),
    "feddyn": (FedDynConfig, FedDyn),
    "fedrs": (FedRSConfig, FedRS),
    "fedsam": (FedSAMConfig, FedSAM),
    "fedspeed": (FedSpeedConfig, FedSpeed),
})


def lookup(name: str) -> tuple[type, type[LocalStrategy]]:
    """``(ConfigClass, StrategyClass)`` of algorithm ``name``; ``ValueError`` lists the known ones."""
    return STRATEGIES.lookup(name)


def build_config(name: str, params: dict[str, Any] | None = None) -> Any:
    """The validated config of algorithm ``name`` from ``params`` (aliases such as ``lambda`` accepted)."""
    return STRATEGIES.build_config(name, params)


def build_strategy(name: str, params: dict[str, Any] | None = None) -> LocalStrategy:
    """A configured strategy for algorithm ``name``; raises ``ValueError`` on unknown names/params."""
    return STRATEGIES.build(name, params)


__all__ = [
    "STRATEGIES", "build_strategy", "build_config", "lookup", "LocalStrategy", "LocalRound", "perturbed_gradients",
    "restricted_logits", "FedAvg", "FedAvgConfig", "FedProx", "FedProxConfig", "FedDyn", "FedDynConfig",
    "FedRS", "FedRSConfig", "FedSAM", "FedSAMConfig", "FedSpeed", "FedSpeedConfig",
]
