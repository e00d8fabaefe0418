"""FedRS: restricted softmax for label-distribution skew.

Li & Zhan, "FedRS: Federated Learning with Restricted Softmax for Label
Distribution Non-IID Data", KDD 2021; eq. (4) of the plugin paper. During local
training the logit of every class the node holds no sample of is multiplied by
``alpha`` in ``(0, 1]`` before the softmax cross-entropy, which limits the
updates of missing classes' classifier weights; held classes keep scale 1.
``alpha = 1`` is exactly FedAvg. The held classes are those with a non-zero
count in the node's whole shard ``y``; the scale applies to the model's output
logits (bias included), so it works for any classifier head. No per-node state;
server step ``sgd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import as_float
from .base import LocalRound, LocalStrategy


@dataclass(frozen=True, kw_only=True)
class FedRSConfig:
    alpha: float = 0.5
    """Scale of the logits of classes the node does not hold, in (0, 1]."""

    def __post_init__(self) -> None:
        as_float(self, "alpha", low=0.0, high=1.0, low_open=True)


def class_counts(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class in ``y`` (``[num_classes]``)."""
    y = y.reshape(-1).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return torch.bincount(y, minlength=num_classes)


def restricted_logits(logits: torch.Tensor, held: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scale the logits of classes not ``held`` (bool ``[C]``) by ``alpha``; others unchanged."""
    if logits.shape[-1] != held.shape[0]:
        raise ValueError(f"logits have {logits.shape[-1]} classes, the held mask {held.shape[0]}")
    scale = torch.where(held.to(logits.device), 1.0, alpha).to(logits.dtype)
    return logits * scale


class FedRS(LocalStrategy):
    name = "fedrs"
    server_step = "sgd"

    def begin_round(self, rnd: LocalRound) -> None:
        if rnd.num_classes is not None:
            rnd.scratch["held"] = class_counts(rnd.y, rnd.num_classes) > 0

    def logits(self, rnd: LocalRound, xb: torch.Tensor) -> torch.Tensor:
        out = rnd.model(xb)
        held = rnd.scratch.get("held")
        if held is None:  # num_classes not given: the model's output width
            held = rnd.scratch["held"] = class_counts(rnd.y, out.shape[-1]) > 0
        return restricted_logits(out, held, self.config.alpha)
