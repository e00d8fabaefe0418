"""FedAvg local training: plain mini-batch SGD on the cross-entropy loss.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017. No hyper-parameters beyond ``TrainConfig``;
no per-node state; server step ``sgd``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import LocalStrategy


@dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    """FedAvg has no algorithm-specific hyper-parameters."""


class FedAvg(LocalStrategy):
    name = "fedavg"
    server_step = "sgd"
