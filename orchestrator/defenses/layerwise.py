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
from .base import DefenseError, DefenseResult, RoundContext, check_updates
from proto.layout import Layout, LayerSpec


@dataclass(frozen=True, kw_only=True)
class LayerwiseConfig(Config):
    """Layerwise wrapper."""

    inner: str | dict = option("median", doc="rule run on each layer (name or table)")


def run_layerwise(rule: Callable[..., DefenseResult], updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
    """``rule`` on each layer's slice of ``updates``, concatenated."""
    n, d = check_updates(updates)
    if ctx.layout.d != d:
        raise DefenseError(f"layerwise needs the round's layout: layout.d = {ctx.layout.d}, updates have d = {d}")
    layers = [layer for layer in ctx.layout if layer.numel > 0]
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    states = child_state(ctx, "layers")
    results = []
    for layer in layers:
        state = states.get(layer.name)
        if not isinstance(state, dict):
            state = states[layer.name] = {}
        sub = dataclasses.replace(
            ctx, layout=Layout((LayerSpec(layer.name, layer.shape, 0, layer.numel, layer.is_buffer),)),
            global_weights=ctx.global_weights[layer.slice], state=state)
        if getattr(rule, "writes_into", False):
            # Rules that can reduce straight into the output slice skip a copy of d.
            res = rule(updates[:, layer.slice], sub, out=out[layer.slice])
        else:
            res = rule(updates[:, layer.slice], sub)
            out[layer.slice] = res.delta
        results.append(res)
    layer_acc = torch.stack([r.accepted.to("cpu", torch.bool) for r in results])
    accepted = layer_acc.any(0)
    weights = None
    if all(r.weights is not None for r in results):
        share = torch.tensor([layer.numel / d for layer in layers], dtype=torch.float64)
        weights = (share[:, None] * torch.stack([r.weights.to("cpu", torch.float64) for r in results])).sum(0)
        weights = weights.to(updates.device, updates.dtype)
    diag: dict[str, Any] = {"layer_accepted": layer_acc, "layers": len(layers), "n_accepted": int(accepted.sum()),
                            "selected": torch.nonzero(accepted).flatten()}
    scores = [r.diagnostics.get("scores") for r in results]
    if all(isinstance(s, torch.Tensor) and s.shape == (n,) for s in scores):
        diag["layer_scores"] = torch.stack([s.to("cpu") for s in scores])
    return DefenseResult(delta=out, accepted=accepted.to(updates.device), weights=weights, diagnostics=diag)


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
