"""Layerwise application of any rule (the ``A^L`` of Layerwise Cosine
Aggregation, Garcia-Marquez et al., arXiv:2503.21244, Proposition 1).

The ``inner`` rule runs independently on each layer's column slice (a zero-copy
view) with a context restricted to that layer (its one-layer layout, its slice
of the global weights, its own state namespace), and the layer aggregates are
concatenated. Every entry of the layout is a layer, BatchNorm running
statistics included (see :mod:`._gram_rule`). The distance-based rules'
``layerwise = true`` option is this same function; for coordinate-wise rules
(median, trimmed mean) the decomposition changes nothing.

A client is accepted when some layer accepts it (``layer_accepted`` holds the
per-layer masks); weights are the parameter-count-weighted mean of the layers'.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._common import Config, build_spec, child_state, option
from ._split import sequential, shards_of
from .base import LOCAL, DefenseError, DefenseResult, RoundContext, Shards, check_updates
from proto.layout import Layout, LayerSpec


@dataclass(frozen=True, kw_only=True)
class LayerwiseConfig(Config):
    """Layerwise wrapper."""

    inner: str | dict = option("median", doc="rule run on each layer (name or table)")


def run_layerwise(rule: Callable[..., DefenseResult], updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
    """``rule`` on each layer's slice of ``updates``, concatenated.

    Among aggregation ranks (``ctx.shards``) each layer runs on one rank (layers
    balanced by size, :meth:`.base.Shards.owners`) and the layers' deltas,
    masks, weights and scores are all-gathered: the one-rank result, bit for
    bit. A rule that keeps state or draws from ``ctx.generator``
    (:func:`._split.sequential`) runs every layer on every rank instead, in
    layer order, each layer split among the ranks as that rule splits."""
    n, d = check_updates(updates)
    if ctx.layout.d != d:
        raise DefenseError(f"layerwise needs the round's layout: layout.d = {ctx.layout.d}, updates have d = {d}")
    layers = [layer for layer in ctx.layout if layer.numel > 0]
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    states = child_state(ctx, "layers")
    shards = shards_of(ctx)
    # A sequential rule's layers run on every rank (each rank owns them all).
    owner = [shards.rank] * len(layers) if sequential(rule) else shards.owners([layer.numel for layer in layers])
    # Layers run whole on their owner; a sequential rule's layers run everywhere, split.
    inner_shards = shards if sequential(rule) else LOCAL
    shared = any(o != shards.rank for o in owner)
    failed: DefenseError | None = None
    results: list[DefenseResult | DefenseError | None] = []
    for i, layer in enumerate(layers):
        state = states.get(layer.name)
        if not isinstance(state, dict):
            state = states[layer.name] = {}
        if owner[i] != shards.rank or failed is not None:
            results.append(None)
            continue
        sub = dataclasses.replace(
            ctx, layout=Layout((LayerSpec(layer.name, layer.shape, 0, layer.numel, layer.is_buffer),)),
            global_weights=ctx.global_weights[layer.slice], state=state, shards=inner_shards)
        try:
            if getattr(rule, "writes_into", False):
                # Rules that can reduce straight into the output slice skip a copy of d.
                res = rule(updates[:, layer.slice], sub, out=out[layer.slice])
            else:
                res = rule(updates[:, layer.slice], sub)
                out[layer.slice] = res.delta
        except DefenseError as exc:
            if not shared:
                raise
            # The other ranks are waiting for this rank's layers: tell them first.
            failed = exc
            results.append(exc)
            continue
        results.append(res)
    acc, wts, scs = _layer_records(results, layers, n, shards, owner, out)
    layer_acc = acc.to(torch.bool)
    accepted = layer_acc.any(0)
    weights = None
    if not bool(torch.isnan(wts).any()):
        share = torch.tensor([layer.numel / d for layer in layers], dtype=torch.float64)
        weights = (share[:, None] * wts).sum(0)
        weights = weights.to(updates.device, updates.dtype)
    diag: dict[str, Any] = {"layer_accepted": layer_acc, "layers": len(layers), "n_accepted": int(accepted.sum()),
                            "selected": torch.nonzero(accepted).flatten()}
    if not bool(torch.isnan(scs).any()):
        diag["layer_scores"] = scs.to(updates.dtype)
    return DefenseResult(delta=out, accepted=accepted.to(updates.device), weights=weights, diagnostics=diag)


def _record(res: DefenseResult | DefenseError | None, n: int) -> torch.Tensor:
    """One layer's accepted mask, weights and scores as a ``[3, n]`` float64 row
    (NaN where the rule gave no weights / no per-client scores; all NaN where the
    rule raised or, after an earlier layer raised, did not run)."""
    rec = torch.full((3, n), float("nan"), dtype=torch.float64)
    if not isinstance(res, DefenseResult):
        return rec
    rec[0] = res.accepted.to("cpu", torch.float64)
    if res.weights is not None:
        rec[1] = res.weights.to("cpu", torch.float64)
    scores = res.diagnostics.get("scores")
    if isinstance(scores, torch.Tensor) and scores.shape == (n,):
        rec[2] = scores.to("cpu", torch.float64)
    return rec


def _layer_records(results: list, layers: list, n: int, shards: Shards, owner: list[int],
                   out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[layers, n]`` accepted, weights and scores of every layer; with the layers
    shared out, the owners' records and delta slices are all-gathered into them
    and into ``out`` (each rank's layers packed in layer order)."""
    if all(isinstance(res, DefenseResult) for res in results):
        recs = torch.stack([_record(res, n) for res in results])
        if all(o == shards.rank for o in owner):
            return recs[:, 0], recs[:, 1], recs[:, 2]
    ranks = range(shards.world_size)
    per_rank = [[i for i in range(len(layers)) if owner[i] == r] for r in ranks]
    mine = per_rank[shards.rank]
    recs = torch.stack([_record(results[i], n) for i in mine]) if mine else torch.zeros(0, 3, n, dtype=torch.float64)
    every = shards.gather(recs, [len(p) for p in per_rank])
    if bool(torch.isnan(every[:, 0, 0]).any()):
        _raise_first_failure(results, shards, every, per_rank)
    packed = torch.cat([out[layers[i].slice] for i in mine]) if mine else out[:0]
    values = shards.gather(packed, [sum(layers[i].numel for i in p) for p in per_rank])
    table = torch.empty(len(layers), 3, n, dtype=torch.float64)
    row = pos = 0
    for p in per_rank:
        for i in p:
            table[i] = every[row]
            row += 1
            if owner[i] != shards.rank:
                out[layers[i].slice] = values[pos:pos + layers[i].numel]
            pos += layers[i].numel
    return table[:, 0], table[:, 1], table[:, 2]


def _raise_first_failure(results: list, shards: Shards, every: torch.Tensor, per_rank: list[list[int]]) -> None:
    """Some layer raised :class:`DefenseError`: raise the first such layer's error
    (as one rank would) on every rank; its text travels as UTF-8 bytes. A rank
    stops at its first failure, so the first layer without a record failed, and
    it is its owner's first failure."""
    order = [i for p in per_rank for i in p]
    first = min(order[row] for row in torch.nonzero(torch.isnan(every[:, 0, 0])).flatten().tolist())
    owner = next(r for r, p in enumerate(per_rank) if first in p)
    mine = next((res for res in results if isinstance(res, DefenseError)), None)
    text = str(mine).encode() if mine is not None and shards.rank == owner else b""
    sizes = [0] * shards.world_size
    sizes[owner] = int(shards.gather(torch.tensor([len(text)], dtype=torch.long), [1] * shards.world_size)[owner])
    raw = shards.gather(torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else
                        torch.zeros(0, dtype=torch.uint8), sizes)
    raise DefenseError(bytes(raw.tolist()).decode())


class Layerwise:
    """Layerwise: run the inner rule on each layer's slice separately and concatenate."""

    name = "layerwise"

    def __init__(self, config: LayerwiseConfig) -> None:
        self.config = config
        self.inner = build_spec(config.inner, f"{self.name}.inner")

    def min_clients(self, f: int) -> int:
        fn = getattr(self.inner, "min_clients", None)
        return int(fn(f)) if callable(fn) else 1

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        return run_layerwise(self.inner, updates, ctx)
