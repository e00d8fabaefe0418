"""Value checks shared by the strategy config dataclasses."""
from __future__ import annotations

import math


def as_float(config: object, name: str, *, low: float | None = None, high: float | None = None,
             low_open: bool = False) -> None:
    """Coerce field ``name`` of a frozen config to ``float`` and check its range."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{type(config).__name__}.{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{type(config).__name__}.{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{type(config).__name__}.{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{type(config).__name__}.{name} must be <= {high}, got {value!r}")
    object.__setattr__(config, name, value)
