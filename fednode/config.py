"""What a node is told about local training: one light dataclass (no torch), shared
by the scenario's ``[training]`` section (``orchestrator.scenario``) and the node's
training loop (``fednode.training``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    algorithm: str = "fedavg"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    params: dict = field(default_factory=dict)
    """The algorithm's own hyper-parameters (e.g. FedProx ``mu``)."""
