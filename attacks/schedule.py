"""Time-varying attack schedules: in which rounds a Byzantine node attacks.

A node follows its schedule and behaves honestly in inactive rounds. Joining
late, leaving and rejoining are the launcher's job, not the schedule's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from proto.seeding import generator

from .base import check_number


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """When the attack is active.

    * ``start_round``: first round the node is Byzantine (inclusive);
    * ``end_round``: first round it is no longer Byzantine (exclusive; None: never ends);
    * ``period_on`` / ``period_off``: from ``start_round``, active ``period_on``
      rounds, then idle ``period_off`` rounds, repeating (both or neither);
    * ``probability``: in a round the window and period allow, active with this
      probability, drawn from ``proto.seeding.generator(seed, "schedule", round)`` so a round's
      decision is reproducible and independent of the order rounds are queried in.
    """

    start_round: int = 0
    end_round: int | None = None
    period_on: int | None = None
    period_off: int | None = None
    probability: float = 1.0

    def __post_init__(self) -> None:
        check_number(self, "start_round", lo=0, integer=True)
        check_number(self, "end_round", lo=0, integer=True, optional=True)
        if self.end_round is not None and self.end_round <= self.start_round:
            raise ValueError(f"end_round={self.end_round}: must be > start_round={self.start_round}")
        check_number(self, "period_on", lo=1, integer=True, optional=True)
        check_number(self, "period_off", lo=0, integer=True, optional=True)
        if (self.period_on is None) != (self.period_off is None):
            key = "period_off" if self.period_off is None else "period_on"
            raise ValueError(f"{key}=None: period_on and period_off must be set together")
        check_number(self, "probability", lo=0.0, hi=1.0)

    def in_window(self, round: int) -> bool:
        """Whether ``round`` is inside the window and an on-phase of the period."""
        if round < self.start_round or (self.end_round is not None and round >= self.end_round):
            return False
        if self.period_on is not None:
            return (round - self.start_round) % (self.period_on + self.period_off) < self.period_on
        return True

    def is_active(self, round: int, generator_or_seed: torch.Generator | int) -> bool:
        """Whether the attack runs in ``round``.

        ``generator_or_seed``: the node's seed, or its generator (its initial seed is
        used; its state is not consumed).
        """
        if not self.in_window(round):
            return False
        if self.probability >= 1.0:
            return True
        if self.probability <= 0.0:
            return False
        seed = generator_or_seed.initial_seed() if isinstance(generator_or_seed, torch.Generator) else int(generator_or_seed)
        g = generator(seed, "schedule", round)
        return bool(torch.rand((), generator=g) < self.probability)


def build_schedule(params: dict[str, Any] | None = None) -> Schedule:
    """``Schedule(**params)`` with an unknown key reported as a ``ValueError`` naming it."""
    params = dict(params or {})
    allowed = [f.name for f in dataclasses.fields(Schedule)]
    for key in params:
        if key not in allowed:
            raise ValueError(f"schedule has no parameter {key!r}; allowed: {', '.join(allowed)}")
    return Schedule(**params)
