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

import dataclasses
from typing import Any

from .base import LocalRound, LocalStrategy, perturbed_gradients
from .fedavg import FedAvg, FedAvgConfig
from .feddyn import FedDyn, FedDynConfig
from .fedprox import FedProx, FedProxConfig
from .fedrs import FedRS, FedRSConfig, restricted_logits
from .fedsam import FedSAM, FedSAMConfig
from .fedspeed import FedSpeed, FedSpeedConfig

STRATEGIES: dict[str, tuple[type, type[LocalStrategy]]] = {
    "fedavg": (FedAvgConfig, FedAvg),
    "fedprox": (FedProxConfig, FedProx),
    "feddyn": (FedDynConfig, FedDyn),
    "fedrs": (FedRSConfig, FedRS),
    "fedsam": (FedSAMConfig, FedSAM),
    "fedspeed": (FedSpeedConfig, FedSpeed),
}


def lookup(name: str) -> tuple[type, type[LocalStrategy]]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


def build_config(name: str, params: dict[str, Any] | None = None) -> Any:
    """The validated config of algorithm ``name`` from ``params`` (aliases such as ``lambda`` accepted)."""
    config_cls, _ = lookup(name)
    aliases: dict[str, str] = getattr(config_cls, "ALIASES", {})
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        field_name = aliases.get(key, key)
        if field_name not in fields:
            allowed = sorted(fields | set(aliases))
            raise ValueError(f"algorithm {name!r} has no parameter {key!r}; allowed: {', '.join(allowed) or '(none)'}")
        if field_name in kwargs:
            raise ValueError(f"algorithm {name!r}: parameter {field_name!r} given twice (as {key!r} and an alias)")
        kwargs[field_name] = value
    try:
        return config_cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"algorithm {name!r}: {exc}") from None


def build_strategy(name: str, params: dict[str, Any] | None = None) -> LocalStrategy:
    """A configured strategy for algorithm ``name``; raises ``ValueError`` on unknown names/params."""
    _, strategy_cls = lookup(name)
    return strategy_cls(build_config(name, params))


__all__ = [
    "STRATEGIES", "build_strategy", "build_config", "lookup", "LocalStrategy", "LocalRound", "perturbed_gradients",
    "restricted_logits", "FedAvg", "FedAvgConfig", "FedProx", "FedProxConfig", "FedDyn", "FedDynConfig",
    "FedRS", "FedRSConfig", "FedSAM", "FedSAMConfig", "FedSpeed", "FedSpeedConfig",
]
