"""Data poisoning: the node corrupts its labels before local training.

Both attacks leave ``x`` untouched and return a new ``y`` (the input is not
modified). The number of flipped samples is ``round(fraction * count)``, chosen
uniformly without replacement with the node's generator, so a seed fixes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import DataAttackBase, check_number


def _pick(count: int, fraction: float, generator: torch.Generator) -> Tensor:
    """``round(fraction * count)`` distinct indices in ``[0, count)`` (CPU/generator device)."""
    k = int(round(fraction * count))
    return torch.randperm(count, generator=generator, device=generator.device)[:k]


def _check_labels(y: Tensor, num_classes: int) -> None:
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes})")


@dataclass(frozen=True, kw_only=True)
class LabelFlipConfig:
    """fraction: share of the node's samples whose label is replaced, in [0, 1]."""

    fraction: float = 1.0

    def __post_init__(self) -> None:
        check_number(self, "fraction", lo=0.0, hi=1.0)


class LabelFlip(DataAttackBase):
    """Random label flipping (Layerwise Cosine Aggregation paper, Sec. 4.2).

    A ``fraction`` of the node's samples, chosen at random, get a label drawn
    uniformly from the *other* ``num_classes - 1`` classes: a flipped label never
    equals the original. Requires ``num_classes >= 2``.
    """

    name = "label_flip"

    def __init__(self, config: LabelFlipConfig) -> None:
        super().__init__(config)

    def poison(self, x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if num_classes < 2:
            raise ValueError(f"label_flip needs num_classes >= 2, got {num_classes}")
        _check_labels(y, num_classes)
        idx = _pick(y.shape[0], self.config.fraction, generator)
        # An offset in [1, C-1] added modulo C is uniform over the other classes.
        offset = torch.randint(1, num_classes, (idx.numel(),), generator=generator, device=generator.device)
        idx, offset = idx.to(y.device), offset.to(y.device, y.dtype)
        y = y.clone()
        y[idx] = (y[idx] + offset) % num_classes
        return x, y


@dataclass(frozen=True, kw_only=True)
class TargetedFlipConfig:
    """source -> target class for a ``fraction`` of the source-class samples."""

    source: int = 0
    target: int = 1
    fraction: float = 1.0

    def __post_init__(self) -> None:
        check_number(self, "source", lo=0, integer=True)
        check_number(self, "target", lo=0, integer=True)
        check_number(self, "fraction", lo=0.0, hi=1.0)
        if self.source == self.target:
            raise ValueError(f"target={self.target!r}: must differ from source")


class TargetedFlip(DataAttackBase):
    """Targeted label flipping: a ``fraction`` of the samples labelled ``source``
    are relabelled ``target``; no other sample is touched (Tolpegin et al. 2020)."""

    name = "targeted_flip"

    def __init__(self, config: TargetedFlipConfig) -> None:
        super().__init__(config)

    def poison(self, x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        cfg = self.config
        for key in ("source", "target"):
            if getattr(cfg, key) >= num_classes:
                raise ValueError(f"{key}={getattr(cfg, key)}: must be < num_classes={num_classes}")
        _check_labels(y, num_classes)
        where = (y == cfg.source).nonzero(as_tuple=True)[0]
        chosen = where[_pick(where.numel(), cfg.fraction, generator).to(y.device)]
        y = y.clone()
        y[chosen] = cfg.target
        return x, y
