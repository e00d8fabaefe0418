"""The defense seam: an ``[n, d]`` update matrix in, one ``[d]`` delta out.

Every defense is a callable ``defense(updates, ctx) -> DefenseResult``. It runs on
whatever device holds ``updates`` (CPU or CUDA), never touches the network, and
keeps any state that must survive rounds (momentum, history) in ``ctx.state``,
a dict of tensors and numbers that the orchestrator checkpoints.

With several aggregation ranks every rank holds the whole ``[n, d]`` matrix and
runs the defense on it; ``ctx.shards`` (:class:`Shards`) lets a rule split the
heavy part of its work (column blocks, layers) among the ranks and exchange
the pieces, so that every rank returns the result one rank would. With one
rank it is :data:`LOCAL`, whose operations are identities.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from proto.layout import Layout


class Shards:
    """How the defense work of one round splits among ``world_size`` ranks that all
    hold the same ``[n, d]`` updates. This base class is the one-rank case
    (:data:`LOCAL`): every operation is an identity, so a rule runs the same code
    at any world size and pays nothing at one rank. The multi-rank implementation
    (over a process group) is :class:`orchestrator.shards.DistShards`; defenses
    never import ``torch.distributed``.

    Contract for a rule using it: every rank calls the same operations in the
    same order with tensors of the same shapes (each rank's part may differ in
    size only where the sizes are passed), and makes every branching decision on
    exchanged (hence identical) values. Column spans are balanced contiguous
    blocks; ``all_reduce_sum`` adds the ranks' tensors in rank order, so every
    rank gets the same bits.
    """

    rank: int = 0
    world_size: int = 1
    # Below this many columns a split costs more in collectives than it saves.
    min_columns: int = 0

    def for_columns(self, d: int, align: int = 1) -> "Shards":
        """The shards to split ``d`` columns with (``align``-column steps): ``self``,
        or :data:`LOCAL` (every rank computes everything) when ``d`` is too small
        to give every rank at least one step, or smaller than ``min_columns``."""
        if self.world_size == 1 or d < max(self.min_columns, self.world_size * max(1, align)):
            return LOCAL
        return self

    def spans(self, d: int, align: int = 1) -> list[tuple[int, int]]:
        """Every rank's ``[start, stop)`` of ``d`` columns: balanced contiguous
        blocks whose inner bounds are multiples of ``align``."""
        w, a = self.world_size, max(1, int(align))
        steps = -(-d // a)
        cuts = [min(d, (steps * r // w) * a) for r in range(w)] + [d]
        return [(cuts[r], cuts[r + 1]) for r in range(w)]

    def span(self, d: int, align: int = 1) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``d`` columns (see :meth:`spans`)."""
        return self.spans(d, align)[self.rank]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (same shape on every rank), in rank order."""
        return t

    def gather(self, part: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's ``part`` concatenated along dim 0 in rank order; ``sizes[r]``
        is rank ``r``'s ``part.shape[0]`` (known to every rank), the other dims equal."""
        return part

    def gather_columns(self, block: torch.Tensor, d: int, align: int = 1,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ``[d]`` vector whose span ``span(d, align)`` each rank computed as
        ``block``, written into ``out`` if given."""
        if out is None or out is block:
            return block
        return out.copy_(block)

    def owners(self, sizes: Sequence[int]) -> list[int]:
        """A rank for each of the parts of these sizes, balanced by size and the
        same on every rank (largest part first to the least loaded rank, ties to
        the lowest index and the lowest rank)."""
        if self.world_size == 1:
            return [0] * len(sizes)
        load = [0] * self.world_size
        owner = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += int(sizes[i])
        return owner


LOCAL = Shards()


@dataclass
class RoundContext:
    """What a defense may know about the round besides the updates.

    ``f`` is the number of Byzantine inputs a rule should tolerate; ``state`` is
    this defense's persistent state (checkpointed by the orchestrator);
    ``model_fn`` builds a fresh model on the updates' device for rules that run it;
    ``shards`` splits the work among the aggregation ranks (:class:`Shards`).
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
    shards: Shards = field(default_factory=lambda: LOCAL)


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
