"""Kill points for the recovery tests: ``BYZFED_KILL_AT=<point>:<round>`` makes the
orchestrator SIGKILL itself the first time it reaches ``point`` in round ``round``,
as a crash there would (nothing flushed, no handler run). Unset, each check is one
comparison.

Points: ``collect`` (the round's first upload accepted, the others still coming),
``aggregate`` (the defense's result computed, not yet applied to the model),
``between`` (the round recorded and checkpointed, the next not opened),
``checkpoint`` (the new checkpoint written to its temporary file, not yet renamed
over the old one).

Only the aggregation rank named by ``BYZFED_KILL_RANK`` (default 0, the leader)
dies there: the other ranks inherit the environment and go on.
"""
from __future__ import annotations

import os
import signal

ENV = "BYZFED_KILL_AT"
POINTS = ("collect", "aggregate", "between", "checkpoint")


def parse(spec: str) -> tuple[str, int] | None:
    """``(point, round)`` of a ``BYZFED_KILL_AT`` value; ValueError naming the allowed values."""
    if not spec:
        return None
    point, _, r = spec.partition(":")
    if point not in POINTS or not r.strip().isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<round> with point one of {', '.join(POINTS)} "
                         "and round an integer >= 0")
    return point, int(r)


_ARMED = parse(os.environ.get(ENV, ""))
_RANK = 0


def set_rank(rank: int) -> None:
    """This process's original aggregation rank (``orchestrator rank`` processes call it)."""
    global _RANK
    _RANK = rank


def reached(point: str, round_id: int) -> None:
    if _ARMED is not None and _ARMED == (point, round_id) and str(_RANK) == os.environ.get("BYZFED_KILL_RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)
