"""Defense registry: ``{name: (ConfigClass, factory)}`` filled in one place.

``build_defense(name, params)`` builds a configured defense; an unknown name lists
the known ones and an unknown parameter is an error naming it (frozen
keyword-only config dataclasses).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .base import DefenseError, DefenseResult, RoundContext
from .mean import Mean, MeanConfig

Defense = Callable[..., DefenseResult]

REGISTRY: dict[str, tuple[type, Callable[[Any], Defense]]] = {
    "mean": (MeanConfig, Mean),
    "fedavg": (MeanConfig, lambda c: Mean(dataclasses.replace(c, weighted=True))),
}


def config_fields(name: str) -> list[tuple[str, str, Any]]:
    """``(param, type, default)`` for each parameter of defense ``name``."""
    config_cls, _ = _lookup(name)
    out = []
    for fld in dataclasses.fields(config_cls):
        default = fld.default if fld.default is not dataclasses.MISSING else (
            fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out.append((fld.name, str(fld.type), default))
    return out


def _lookup(name: str):
    try:
        return REGISTRY[name]
    except KeyError:
        raise DefenseError(f"unknown defense {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    config_cls, factory = _lookup(name)
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise DefenseError(
            f"defense {name!r} has no parameter {unknown[0]!r}; allowed: {', '.join(sorted(known)) or '(none)'}")
    try:
        config = config_cls(**params)
    except (TypeError, ValueError) as exc:
        raise DefenseError(f"defense {name!r}: {exc}") from None
    return factory(config)


__all__ = ["REGISTRY", "build_defense", "config_fields", "DefenseError", "DefenseResult", "RoundContext"]
