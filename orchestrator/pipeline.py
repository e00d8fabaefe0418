"""The aggregation pipeline: rows -> gather -> defend -> server step -> evaluate -> record.

One unit with a public interface and no transport: the synchronous and the
asynchronous drivers hand it a round's manifest (who counts, in canonical order,
with their sample counts) and the matching ``[k, d]`` rows (from the row store,
or gathered across the aggregation group by ``group.Leader``); it runs the
defense on the aggregation device (:meth:`AggregationPipeline.defend`, on every
rank of the group), applies the server step to the global model, evaluates it
and records the metrics row (:meth:`AggregationPipeline.apply`, the leader). A defense that cannot run this round
(``DefenseError``, e.g. Krum with too few reports after drop-outs) or that
returns a non-finite aggregate skips the round with the reason: the model stays
as it was and the run goes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from proto.layout import Layout

from .collective import AggregationGroup
from .defenses import DefenseError, RoundContext
from .metrics import detection_scores


@dataclass
class GlobalModel:
    """The federation's model state: what checkpoints hold and downloads serve."""

    weights: torch.Tensor
    """Flat float32 weights on the host, in the layout's order."""
    version: int = 0
    defense_state: dict[str, Any] = field(default_factory=dict)
    step_state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The uploads a round aggregates, in canonical order (one row each)."""

    names: tuple[str, ...]
    num_samples: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)


class AggregationPipeline:
    def __init__(self, *, layout: Layout, device: torch.device, group: AggregationGroup, defense: Callable,
                 f: int, server_step: Callable, server_lr: float, param_mask: Optional[torch.Tensor],
                 evaluate: Callable[[torch.Tensor], tuple[float, float]], model_fn: Callable[[], torch.nn.Module],
                 generator: Callable[[int], torch.Generator], num_nodes: int, byzantine: frozenset[str],
                 record: Callable[[dict[str, Any]], None]) -> None:
        self.layout, self.device, self.group = layout, device, group
        self.defense, self.f = defense, f
        self.server_step, self.server_lr, self.param_mask = server_step, server_lr, param_mask
        self.evaluate, self.model_fn, self.generator = evaluate, model_fn, generator
        self.num_nodes, self.byzantine, self.record = num_nodes, byzantine, record

    def run(self, model: GlobalModel, round_id: int, rows: torch.Tensor, manifest: Manifest, row: dict[str, Any],
            scale: Optional[torch.Tensor] = None) -> bool:
        """Aggregate ``rows`` (``[len(manifest), d]``, every row of the round: the
        aggregation group gathered them already) into ``model``; write ``row``. Returns
        whether the model moved. ``scale``: per-row factors applied before the defense
        (async staleness weights)."""
        t1 = time.monotonic()
        result = self.defend(model, round_id, rows, manifest, scale)
        return self.apply(model, result, manifest, row, time.monotonic() - t1)

    def defend(self, model: GlobalModel, round_id: int, rows: torch.Tensor, manifest: Manifest,
               scale: Optional[torch.Tensor] = None):
        """The defense's result on the round's rows, or the reason it cannot run this round
        (a string). Every aggregation rank calls this on the same rows, with the same
        context and the same state: the work is split across ranks (``shards``) and every
        rank ends with the same result."""
        if scale is not None:
            rows = rows * scale.to(rows.dtype)[:, None]
        updates = rows.to(self.device)
        ctx = RoundContext(layout=self.layout, global_weights=model.weights.to(self.device), round=round_id,
                           f=self.f, generator=self.generator(round_id), state=model.defense_state,
                           model_fn=self.model_fn,
                           sample_counts=torch.tensor(manifest.num_samples, dtype=torch.float32),
                           client_ids=list(manifest.names), **self._split())
        try:
            return self.defense(updates, ctx)
        except DefenseError as exc:
            return f"skipped: {exc}"

    def _split(self) -> dict[str, Any]:
        """The defenses' work split across the group's ranks (``shards``), if several."""
        if self.group.world_size == 1:
            return {}
        from .shards import DistShards
        return {"shards": DistShards(self.group.group)}

    def apply(self, model: GlobalModel, result, manifest: Manifest, row: dict[str, Any], t_aggregate: float) -> bool:
        """Apply a :meth:`defend` result to ``model`` (the leader), evaluate, record ``row``."""
        if isinstance(result, str):
            row.update(outcome=result, t_aggregate=round(t_aggregate, 4))
            self.record(row)
            return False
        delta = result.delta.to("cpu", torch.float32)
        if not torch.isfinite(delta).all():
            row.update(outcome="skipped: defense returned non-finite delta", t_aggregate=round(t_aggregate, 4))
            self.record(row)
            return False
        model.weights = model.weights + self.server_step(
            delta, model.step_state, num_participants=int(result.accepted.sum()), num_nodes=self.num_nodes,
            lr=self.server_lr, mask=self.param_mask)
        model.version += 1
        t2 = time.monotonic()
        acc, loss = self.evaluate(model.weights)
        accepted = dict(zip(manifest.names, map(bool, result.accepted.cpu().tolist())))
        self._measure(row, accepted, acc, loss, t_aggregate, time.monotonic() - t2, float(delta.norm()))
        row["diagnostics"] = {k: v for k, v in result.diagnostics.items() if isinstance(v, (int, float, str, bool))}
        self.record(row)
        return True

    def _measure(self, row: dict[str, Any], accepted: dict[str, bool], acc: float, loss: float, t_aggregate: float,
                 t_evaluate: float, norm: float) -> None:
        n_acc = sum(accepted.values())
        byz_acc = sum(1 for n, ok in accepted.items() if ok and n in self.byzantine)
        row.update(accuracy=acc, loss=loss, accepted=n_acc,
                   rejected=sorted(n for n, ok in accepted.items() if not ok),
                   byzantine_accepted=byz_acc,
                   byzantine_share_selected=round(row.get("byzantine_selected", 0) / max(1, row.get("selected", 0)), 4),
                   byzantine_share_accepted=round(byz_acc / max(1, n_acc), 4),
                   t_aggregate=round(t_aggregate, 4), t_evaluate=round(t_evaluate, 4), update_norm=norm)
        if self.byzantine:
            row.update(detection_scores(accepted, set(self.byzantine)))


def trusted_counts(names: Sequence[str], claimed: Sequence[int], assigned: dict[str, int], mode: str,
                   ratio: float) -> tuple[tuple[int, ...], list[str]]:
    """The sample counts the defenses may weight by, and the names whose claim was cut.

    A count is self-reported, so it never reaches a rule as claimed: ``assigned`` (the
    default) caps each claim at the size of the shard the orchestrator assigned to that
    node (a node may claim less, e.g. after dropping samples, never more);
    ``median`` (nodes that bring their own data, shard sizes unknown) caps each claim at
    ``ratio`` times the median claim of the round, so no single node can outweigh the
    others by claiming an absurd count."""
    if mode == "assigned":
        caps = [assigned.get(n, 1) for n in names]
    elif mode == "median":
        ordered = sorted(claimed)
        median = ordered[(len(ordered) - 1) // 2] if ordered else 1
        caps = [max(1, int(ratio * median))] * len(claimed)
    else:
        raise ValueError(f"unknown sample-count mode {mode!r}; allowed: 'assigned', 'median'")
    out = tuple(max(1, min(int(c), cap)) for c, cap in zip(claimed, caps))
    return out, [n for n, c, t in zip(names, claimed, out) if t != c]


def manifest_of(uploads: Sequence, name_of: Callable[[str], str], assigned: dict[str, int], mode: str = "assigned",
                ratio: float = 2.0) -> tuple[Manifest, list[str]]:
    """The manifest of ledger uploads (already in canonical order) with trusted sample
    counts (:func:`trusted_counts`), and the names whose claimed count was cut."""
    names = tuple(name_of(u.node_id) for u in uploads)
    counts, capped = trusted_counts(names, [u.num_samples for u in uploads], assigned, mode, ratio)
    return Manifest(names, counts), capped
