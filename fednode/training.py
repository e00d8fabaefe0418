"""Local training on a node's shard: the honest part of a round.

``train_local`` loads the global weights into the model, runs the configured
local algorithm (``config.algorithm`` with hyper-parameters ``config.params``,
see :mod:`fednode.strategies`) for ``epochs`` over the shard and returns the
update delta (local weights minus global weights) as one flat float32 vector in
the layout's order — the only thing that leaves the node. Every algorithm
returns this same kind of delta, so the defenses always see ``local - global``.

Algorithms: ``fedavg``, ``fedprox`` (``mu``), ``feddyn`` (``alpha``), ``fedrs``
(``alpha``), ``fedsam`` (``rho``), ``fedspeed`` (``lambda``/``lam``, ``rho``,
``alpha``).

Per-node state
--------------
FedDyn (``h_i``) and FedSpeed (prox-correction ``g^_i``) keep a correction
vector across rounds. It lives in the ``state`` dict that the node passes to
every ``train_local`` call and keeps **in memory** for the life of the node
process; the algorithms store only tensors there (flat float32 ``[d]``, keys
``feddyn_h`` / ``fedspeed_ghat``). Consequences:

* a node that drops out and rejoins in the same process keeps its state object
  while it reconnects, so its correction continues where it stopped;
* a **new** node (new process, or an empty dict) starts from zeros — the
  algorithms' own initialisation (Acar et al. 2021; Sun et al. 2023);
* these algorithms require a state dict (``state=None`` raises
  ``ValueError``); for the stateless ones ``None`` is fine.

``num_classes`` (and the class counts of ``y``) are what FedRS uses to find the
classes the node does not hold; when ``None`` the model's output width is used.
The server side of FedDyn is ``orchestrator.server_step`` (the strategy's
``server_step`` attribute names the step to use).
"""
from __future__ import annotations

from typing import Any

import torch

from proto.layout import Layout

from .config import TrainConfig
from .strategies import build_strategy
from .strategies.base import batches

__all__ = ["TrainConfig", "batches", "train_local"]


def train_local(model: torch.nn.Module, layout: Layout, global_vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                config: TrainConfig, generator: torch.Generator, state: dict[str, Any] | None = None,
                num_classes: int | None = None) -> torch.Tensor:
    """Train from ``global_vec`` on ``(x, y)`` and return ``local - global`` (float32, ``[d]``).

    ``state`` is the node's persistent per-algorithm state (kept across rounds by
    the node, e.g. FedDyn's ``h``); see the module docstring. Raises
    ``ValueError`` for an unknown algorithm or parameter."""
    strategy = build_strategy(config.algorithm, config.params)
    return strategy.train(model, layout, global_vec, x, y, config, generator, state, num_classes)
