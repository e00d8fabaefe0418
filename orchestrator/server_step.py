"""Server-side application of the aggregated delta.

A server step turns the round's aggregate (the defense's output, a ``local -
global`` delta like every update) into the change of the global weights:

    step(agg_delta, state, *, num_participants, num_nodes, lr, mask=None) -> Tensor[d]

and the orchestrator does ``global += step(...)``. ``state`` is the step's
persistent dict (tensors only; the orchestrator checkpoints it with
``torch.save``). ``num_participants`` is the number of updates the aggregate
stands for (the accepted ones); ``num_nodes`` the total number of nodes ``m``.
``mask`` (optional bool ``[d]``, see :func:`parameter_mask`) marks the trainable
parameters; entries outside it (BatchNorm statistics) get the plain
``lr * agg_delta``.

* ``sgd``: ``lr * agg_delta`` (FedAvg, FedProx, FedRS, FedSAM, FedSpeed).
* ``feddyn`` (Acar et al., ICLR 2021): ``h <- h - alpha * (1/m) sum_{i in P} (w_i - w_g)``,
  computed as ``h - alpha * (|P| / m) * agg_delta``, then
  ``w_g <- w_g + lr * agg_delta - h / alpha`` (with ``lr = 1`` this is
  ``mean(w_i) - h / alpha``). ``h`` uses the unscaled aggregate: it mirrors the
  mean of the nodes' own ``h_i``, which they update with their unscaled drift.
  ``alpha`` must equal the nodes' FedDyn ``alpha``.

:func:`server_step_for_algorithm` picks the step that a local algorithm names
in its ``server_step`` attribute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from proto.layout import Layout
from proto.registry import Registry

ServerStep = Callable[..., torch.Tensor]


def parameter_mask(layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[d]``: ``True`` on the entries of trainable parameters, ``False`` on buffers."""
    mask = torch.ones(layout.d, dtype=torch.bool, device=device)
    for layer in layout:
        if layer.is_buffer:
            mask[layer.slice] = False
    return mask


def _check(agg_delta: torch.Tensor, num_participants: int, num_nodes: int) -> None:
    if agg_delta.dim() != 1:
        raise ValueError(f"agg_delta must be a 1-D [d] tensor, got shape {tuple(agg_delta.shape)}")
    if num_nodes <= 0 or not 0 <= num_participants <= num_nodes:
        raise ValueError(f"need 0 <= num_participants <= num_nodes and num_nodes > 0, "
                         f"got {num_participants} and {num_nodes}")


@dataclass(frozen=True, kw_only=True)
class SgdStepConfig:
    """The plain step has no parameters (the server ``lr`` comes with each call)."""


class SgdStep:
    def __init__(self, config: SgdStepConfig) -> None:
        self.config = config

    def __call__(self, agg_delta: torch.Tensor, state: dict[str, Any], *, num_participants: int, num_nodes: int,
                 lr: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check(agg_delta, num_participants, num_nodes)
        return lr * agg_delta


@dataclass(frozen=True, kw_only=True)
class FedDynStepConfig:
    alpha: float = 0.01
    """FedDyn's regularisation strength (> 0); the nodes must use the same value."""

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"FedDynStepConfig.alpha must be a number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))


class FedDynStep:
    def __init__(self, config: FedDynStepConfig) -> None:
        self.config = config

    def __call__(self, agg_delta: torch.Tensor, state: dict[str, Any], *, num_participants: int, num_nodes: int,
                 lr: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check(agg_delta, num_participants, num_nodes)
        alpha = self.config.alpha
        h = state.get("h")
        if h is None:
            h = torch.zeros_like(agg_delta)
        elif h.shape != agg_delta.shape:
            raise ValueError(f"feddyn server state h has shape {tuple(h.shape)}, agg_delta {tuple(agg_delta.shape)}")
        h = h.to(agg_delta)
        drift = agg_delta if mask is None else agg_delta * mask.to(agg_delta.device)
        h = h - alpha * (num_participants / num_nodes) * drift
        state["h"] = h
        return lr * agg_delta - h / alpha


SERVER_STEPS: Registry = Registry("server step", error=ValueError, entries={
    "sgd": (SgdStepConfig, SgdStep),
    "feddyn": (FedDynStepConfig, FedDynStep),
})


def build_server_step(name: str, params: dict[str, Any] | None = None) -> ServerStep:
    """A configured server step; unknown name or parameter -> ``ValueError``."""
    return SERVER_STEPS.build(name, params)


def server_step_for_algorithm(algorithm: str, params: dict[str, Any] | None = None) -> ServerStep:
    """The server step a local algorithm needs, configured from the algorithm's own params.

    Only the params the step knows are passed on (FedDyn's ``alpha``), so the
    node and server use the same value; an invalid algorithm config raises here too.
    """
    from fednode.strategies import build_config, lookup

    build_config(algorithm, params)  # validate the algorithm's params as the nodes will
    _, strategy_cls = lookup(algorithm)
    step_name = strategy_cls.server_step
    known = set(SERVER_STEPS.allowed(step_name))
    return build_server_step(step_name, {k: v for k, v in (params or {}).items() if k in known})
