"""The defense seam: an ``[n, d]`` update matrix in, one ``[d]`` delta out.

Every defense is a callable ``defense(updates, ctx) -> DefenseResult``. It runs on
whatever device holds ``updates`` (CPU or CUDA), never touches the network, and
keeps any state that must survive rounds (momentum, history) in ``ctx.state``,
a dict of tensors and numbers that the orchestrator checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from proto.layout import Layout


@dataclass
class RoundContext:
    """What a defense may know about the round besides the updates.

    ``f`` is the number of Byzantine inputs a rule should tolerate; ``state`` is
    this defense's persistent state (checkpointed by the orchestrator);
    ``model_fn`` builds a fresh model on the updates' device for rules that run it.
    """

    layout: Layout
    global_weights: torch.Tensor
    round: int = 0
    f: int = 0
    generator: Optional[torch.Generator] = None
    state: dict[str, Any] = field(default_factory=dict)
    model_fn: Optional[Callable[[], torch.nn.Module]] = None
    sample_counts: Optional[torch.Tensor] = None
    client_ids: Optional[list[str]] = None


@dataclass
class DefenseResult:
    """Aggregate delta ``[d]``, per-client weights ``[n]`` (sum to 1 over accepted
    rows where the rule is a weighted mean) and the accepted mask ``[n]``, plus
    diagnostics (scores, clusters, chosen indices) that metrics may record."""

    delta: torch.Tensor
    accepted: torch.Tensor
    weights: Optional[torch.Tensor] = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


class DefenseError(ValueError):
    """A defense cannot run on these inputs (e.g. ``n < 2f + 3`` for Krum)."""


def check_updates(updates: torch.Tensor) -> tuple[int, int]:
    if updates.dim() != 2:
        raise DefenseError(f"updates must be a 2-D [n, d] tensor, got shape {tuple(updates.shape)}")
    n, d = updates.shape
    if n == 0:
        raise DefenseError("no updates to aggregate (n = 0)")
    return n, d
