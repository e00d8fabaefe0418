"""The shared local-training loop and the hooks each algorithm overrides.

:class:`LocalStrategy` owns the epoch / mini-batch loop (one SGD optimizer over
the model's trainable parameters, mini-batches from
:func:`batches`). An algorithm changes the loop only through
small hooks:

* :meth:`~LocalStrategy.logits` — the forward pass (FedRS restricts the softmax);
* :meth:`~LocalStrategy.compute_gradients` — fill ``p.grad`` for one mini-batch
  (FedSAM / FedSpeed use :func:`perturbed_gradients`);
* :meth:`~LocalStrategy.add_gradient_terms` — add the gradient of a regulariser
  on the weights (FedProx, FedDyn, FedSpeed);
* :meth:`~LocalStrategy.begin_round` / :meth:`~LocalStrategy.end_round` — read
  and update the node's persistent state; ``end_round`` may also change the
  local model that is reported (FedSpeed).

Per-node state vectors are flat ``float32 [d]`` tensors in the layout's order,
zero on buffer entries (BatchNorm statistics are not optimised, so no
correction applies to them). The state dict holds tensors only, so a node with
``--state-dir`` can keep it on disk between rounds (``fednode.node_state``:
``torch.save``, loaded with ``weights_only=True``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from proto.layout import Layout


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    """One epoch of shuffled mini-batches."""
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


@dataclass
class LocalRound:
    """What one call of local training works on.

    ``params`` are the model's trainable parameters; ``param_slices`` their
    places in the flat vector; ``global_params`` detached copies of their
    values at the start of the round (the global model); ``param_mask`` is
    ``True`` on the flat entries that belong to a trainable parameter.
    ``scratch`` holds per-round values a strategy prepares in ``begin_round``.
    """

    model: torch.nn.Module
    layout: Layout
    global_vec: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    config: Any
    generator: torch.Generator
    state: dict[str, Any]
    num_classes: int | None
    params: list[torch.Tensor]
    param_slices: list[slice]
    global_params: list[torch.Tensor]
    param_mask: torch.Tensor
    scratch: dict[str, Any] = field(default_factory=dict)

    def param_views(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat ``[d]`` vector shaped as each trainable parameter."""
        return [vec[s].view(p.shape) for s, p in zip(self.param_slices, self.params)]

    def state_vector(self, key: str) -> torch.Tensor:
        """The node's flat state tensor ``key``; zeros ``[d]`` the first time (a new node)."""
        d = self.layout.d
        value = self.state.get(key)
        if value is None:
            return torch.zeros(d, dtype=torch.float32, device=self.global_vec.device)
        if not isinstance(value, torch.Tensor) or value.shape != (d,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"node state {key!r} must be a float tensor of shape ({d},), got {shape}")
        return value.to(device=self.global_vec.device, dtype=torch.float32)

    def load_state(self, key: str) -> None:
        """Keep the state vector ``key`` for this round in ``scratch[key]`` and its
        per-parameter views (in each parameter's dtype) in ``scratch[key + "_views"]``."""
        vec = self.scratch[key] = self.state_vector(key)
        self.scratch[key + "_views"] = [v.to(p.dtype) for v, p in zip(self.param_views(vec), self.params)]


def ensure_grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, created as zeros for a parameter the loss did not reach."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class LocalStrategy:
    """FedAvg's local SGD; subclasses override the hooks, never the loop."""

    name: ClassVar[str] = "fedavg"
    server_step: ClassVar[str] = "sgd"
    """Name of the matching server step in ``orchestrator.server_step.SERVER_STEPS``."""
    stateful: ClassVar[bool] = False
    """Whether the node must keep a state dict across rounds for this algorithm."""

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- hooks -------------------------------------------------------------
    def begin_round(self, rnd: LocalRound) -> None:
        """Prepare per-round values (e.g. views of the node's correction state)."""

    def logits(self, rnd: LocalRound, xb: torch.Tensor) -> torch.Tensor:
        return rnd.model(xb)

    def loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The data loss ``F_k`` on one mini-batch (cross-entropy)."""
        return F.cross_entropy(self.logits(rnd, xb), yb)

    def compute_gradients(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Leave the data-loss gradient of this mini-batch in ``p.grad``."""
        self.loss(rnd, xb, yb).backward()

    def add_gradient_terms(self, rnd: LocalRound) -> None:
        """Add the gradient of any regulariser on the weights to ``p.grad``."""

    def end_round(self, rnd: LocalRound, local_vec: torch.Tensor) -> torch.Tensor:
        """Update the node's state; return the local model to report (flat ``[d]``)."""
        return local_vec

    # -- the loop ----------------------------------------------------------
    def train(self, model: torch.nn.Module, layout: Layout, global_vec: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor, config: Any, generator: torch.Generator, state: dict[str, Any] | None = None,
              num_classes: int | None = None) -> torch.Tensor:
        """Train from ``global_vec`` and return ``local - global`` (float32 ``[d]``)."""
        if state is None:
            if self.stateful:
                raise ValueError(f"algorithm {self.name!r} keeps per-node state across rounds: "
                                 "pass the node's state dict (an empty dict for a new node)")
            state = {}
        layout.load_into(model, global_vec)
        model.train()
        rnd = self._make_round(model, layout, global_vec, x, y, config, generator, state, num_classes)
        self.begin_round(rnd)
        opt = torch.optim.SGD(rnd.params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            for xb, yb in batches(x, y, config.batch_size, generator):
                opt.zero_grad(set_to_none=True)
                self.compute_gradients(rnd, xb, yb)
                self.add_gradient_terms(rnd)
                opt.step()
        local_vec = self.end_round(rnd, layout.flatten(model.state_dict()).to(global_vec.device))
        return local_vec - global_vec

    @staticmethod
    def _make_round(model, layout, global_vec, x, y, config, generator, state, num_classes) -> LocalRound:
        by_name = {layer.name: layer for layer in layout}
        params, slices = [], []
        mask = torch.zeros(layout.d, dtype=torch.bool, device=global_vec.device)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            layer = by_name.get(name)
            if layer is None or layer.is_buffer:
                raise ValueError(f"trainable parameter {name!r} is not a parameter of the layout")
            params.append(p)
            slices.append(layer.slice)
            mask[layer.slice] = True
        global_params = [p.detach().clone() for p in params]
        return LocalRound(model, layout, global_vec, x, y, config, generator, state, num_classes,
                          params, slices, global_params, mask)


def perturbed_gradients(strategy: LocalStrategy, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, *,
                        rho: float, normalize: bool, mix: float = 1.0) -> None:
    """Leave ``(1 - mix) * g(w) + mix * g(w + e)`` in ``p.grad`` (the weights stay ``w``).

    ``g`` is the mini-batch gradient of ``strategy.loss``; the ascent step is
    ``e = rho * g(w) / ||g(w)||`` when ``normalize`` (SAM, Foret et al. 2021) and
    ``e = rho * g(w)`` otherwise (FedSpeed's extra step). ``||.||`` is the norm
    over all trainable parameters together. Buffers (BatchNorm statistics) are
    restored after the pass at the perturbed point, so they advance once per
    mini-batch, at ``w``. A zero gradient gives ``e = 0``.
    """
    strategy.loss(rnd, xb, yb).backward()
    g1 = [None if p.grad is None else p.grad.detach().clone() for p in rnd.params]
    present = [g for g in g1 if g is not None]
    if not present:
        return
    if normalize:
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in present]))
        if norm.item() == 0.0:
            return
        factor = rho / norm
    else:
        factor = rho
    saved_params = [p.detach().clone() for p in rnd.params]
    saved_buffers = [b.detach().clone() for b in rnd.model.buffers()]
    with torch.no_grad():
        for p, g in zip(rnd.params, g1):
            if g is not None:
                p.add_(g * factor)
    for p in rnd.params:
        p.grad = None
    strategy.loss(rnd, xb, yb).backward()
    with torch.no_grad():
        for p, saved in zip(rnd.params, saved_params):
            p.copy_(saved)
        for b, saved in zip(rnd.model.buffers(), saved_buffers):
            b.copy_(saved)
        if mix != 1.0:
            for p, g in zip(rnd.params, g1):
                if g is None and p.grad is None:
                    continue
                g_at_w = torch.zeros_like(p) if g is None else g
                g_at_e = torch.zeros_like(p) if p.grad is None else p.grad
                p.grad = (1.0 - mix) * g_at_w + mix * g_at_e
