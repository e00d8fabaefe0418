"""Virtual-data consistency scoring plugin (Lee, Gong, Kang, "Embedding
Byzantine Fault Tolerance into Federated Learning via Virtual Data-Driven
Consistency Scoring Plugin", 2025, Algorithm 1).

``probes`` virtual inputs ``v_p ~ N(0, I)`` shaped like the model input are
drawn from ``ctx.generator``. Each client's model runs on them up to its
features (``model.features(x)`` when the model has it, otherwise every child
module but the last, applied in order), giving ``f_i^p``. Then
``s_ij = mean_p cos(f_i^p, f_j^p)`` (zero feature vectors count as orthogonal;
a model with non-finite features scores -inf),
each client's score is its mean similarity to the others, the ``m`` lowest
scores (default ``f``; ties by lowest index) are dropped and the rest go to the
``inner`` rule (default: mean, as in the paper) with the same ``f``.
Requirement: ``m < n``.

Which weights run the model: Eq. 15-16 write the features as
``g(v; Delta w_i)``, the deviation from the global model, while Fig. 2 compares
local models against the global one. ``model = "local"`` (default) runs the
client's local model ``global_weights + delta``, the network the client
actually trained, whose features are meaningful inputs to a classifier and
which exposes boosted (scaled) updates; ``model = "delta"`` loads the bare
delta as the parameters, the literal reading of Eq. 15 (normalisation buffers
still come from the local model: a running-variance delta is not a variance
and would turn BatchNorm's output into NaN).

All ``n`` feature passes run as one batched call, ``torch.func.vmap`` over
``functional_call`` with the stacked per-client parameters (BatchNorm in eval
mode, with each client's running statistics); ``clients_per_pass`` bounds the
clients per vmap chunk when activations would not fit. ``input_shape`` defaults
to ``model.input_shape``.

Among aggregation ranks (``ctx.shards``) the probes and feature passes run on
every rank (the same generator seed gives the same probes), and the inner rule
splits its own work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import Config, build_spec, mask_of, option, stable_order, sub_context, through_mixing, without_rows
from ._geometry import nonfinite_rows
from .base import DefenseError, DefenseResult, RoundContext, check_updates


@dataclass(frozen=True, kw_only=True)
class VDCConfig(Config):
    """Virtual-data consistency plugin."""

    m: int | None = option(None, check=lambda v: v >= 0, rule="must be >= 0",
                           doc="clients dropped (lowest scores); None: f")
    probes: int = option(32, check=lambda v: v >= 1, rule="must be >= 1", doc="virtual N(0, I) inputs")
    input_shape: tuple[int, ...] | None = option(None, check=lambda v: len(v) > 0 and all(
        isinstance(s, int) and s > 0 for s in v), rule="must be a non-empty list of positive ints",
        doc="probe shape without batch dim; None: model.input_shape")
    model: str = option("local", "local", "delta", doc="weights run: global + delta (local model) or the delta")
    clients_per_pass: int | None = option(None, check=lambda v: v >= 1, rule="must be >= 1",
                                          doc="clients per batched feature pass; None: all")
    inner: str | dict = option("mean", doc="rule applied to the kept updates (name or table)")


class _Features(nn.Module):
    """The model's feature extractor, with the model's parameter names under ``m.``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.m, "features"):
            return self.m.features(x)
        for child in list(self.m.children())[:-1]:
            x = child(x)
        return x


def client_features(model: nn.Module, layout, weights: torch.Tensor, probes: torch.Tensor,
                    chunk: int | None = None) -> torch.Tensor:
    """``[n, probes, k]`` features of the ``n`` parameter vectors (rows of ``weights``)."""
    from torch.func import functional_call, vmap

    net = _Features(model).to(weights.device).eval()
    n = weights.shape[0]
    params = {f"m.{layer.name}": weights[:, layer.slice].reshape(n, *layer.shape) for layer in layout}

    def one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(net, p, (probes,), strict=False)

    with torch.no_grad():
        feats = vmap(one, chunk_size=chunk)(params)
    return feats.reshape(n, probes.shape[0], -1)


def consistency_scores(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over probes of the pairwise feature cosines (``[n, n]``) and each
    client's mean similarity to the others (``[n]``), float64 on CPU."""
    n, p, _ = feats.shape
    # A model whose features overflow or go NaN (e.g. a negative running
    # variance) is as inconsistent as it gets: it scores -inf, dropped first.
    broken = ~torch.isfinite(feats).reshape(n, -1).all(1)
    feats = torch.where(broken[:, None, None], torch.zeros_like(feats), feats)
    norms = torch.linalg.vector_norm(feats, dim=2, keepdim=True)
    unit = torch.where(norms > 0, feats / norms.clamp_min(torch.finfo(feats.dtype).tiny), torch.zeros_like(feats))
    flat = unit.reshape(n, -1).to(torch.float64)
    sim = (flat @ flat.T).cpu() / p
    score = (sim.sum(1) - sim.diagonal()) / max(n - 1, 1)
    score[broken.cpu()] = float("-inf")
    return sim, score


class VirtualDataConsistency:
    """Virtual-data consistency plugin: drop the m clients whose models' features on random probes agree least with the others, then apply the inner rule (default mean)."""

    name = "vdc"
    sequential = True  # draws its probes from ctx.generator (see _split.sequential)

    def __init__(self, config: VDCConfig) -> None:
        self.config = config
        self.inner = build_spec(config.inner, f"{self.name}.inner")

    def min_clients(self, f: int) -> int:
        m = f if self.config.m is None else self.config.m
        fn = getattr(self.inner, "min_clients", None)
        return m + (int(fn(f)) if callable(fn) else 1)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> DefenseResult:
        n, d = check_updates(updates)
        m = int(ctx.f) if self.config.m is None else self.config.m
        bad = nonfinite_rows(updates)
        if bad.any():
            # Rows holding NaN/Inf (whose models may even give finite features when
            # the NaN sits in the classifier) are dropped first, and count among the m.
            b = int(bad.sum())
            return without_rows(self.name, updates, ctx, bad,
                                lambda rows, sub: self._aggregate(rows, sub, max(m - b, 0)))
        return self._aggregate(updates, ctx, m)

    def _aggregate(self, updates: torch.Tensor, ctx: RoundContext, m: int) -> DefenseResult:
        n, d = check_updates(updates)
        cfg = self.config
        if m >= n:
            raise DefenseError(f"{self.name} needs m < n (m = {m}, n = {n})")
        if ctx.model_fn is None:
            raise DefenseError(f"{self.name} needs ctx.model_fn to build the model it scores")
        if ctx.generator is None:
            raise DefenseError(f"{self.name} needs ctx.generator (a seeded torch.Generator) for its probes")
        if ctx.layout.d != d:
            raise DefenseError(f"{self.name}: layout.d = {ctx.layout.d} but updates have d = {d}")
        model = ctx.model_fn()
        shape = cfg.input_shape or getattr(model, "input_shape", None)
        if not shape:
            raise DefenseError(f"{self.name} needs input_shape (parameter, or model.input_shape)")
        probes = torch.randn((cfg.probes, *shape), generator=ctx.generator, device=ctx.generator.device)
        probes = probes.to(updates.device, updates.dtype)
        gw = ctx.global_weights.to(updates.device, updates.dtype)
        if cfg.model == "local":
            weights = updates + gw
        else:
            weights = updates.clone()
            for layer in ctx.layout:
                if layer.is_buffer:  # a running-variance delta is no variance: keep the local statistics
                    weights[:, layer.slice] += gw[layer.slice]
        feats = client_features(model.to(updates.dtype), ctx.layout, weights, probes, cfg.clients_per_pass)
        del weights
        sim, score = consistency_scores(feats)
        keep = torch.sort(stable_order(score)[m:]).values
        rows = updates if m == 0 else updates.index_select(0, keep.to(updates.device))
        res = self.inner(rows, sub_context(ctx, state_key="inner", rows=None if m == 0 else keep))
        select = torch.zeros(keep.numel(), n, dtype=torch.float64)
        select[torch.arange(keep.numel()), keep] = 1.0
        accepted, weights_out = through_mixing(res, select, n)
        diag = dict(res.diagnostics)
        diag.update(scores=score, similarity=sim, kept=mask_of(keep, n, torch.device("cpu")),
                    n_accepted=int(accepted.sum()), dropped=m)
        return DefenseResult(delta=res.delta, accepted=accepted.to(updates.device),
                             weights=None if weights_out is None else weights_out.to(updates.device, updates.dtype),
                             diagnostics=diag)
