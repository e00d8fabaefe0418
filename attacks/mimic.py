"""Mimic (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-Robust Learning on
Heterogeneous Datasets via Bucketing"): every Byzantine node uploads a copy of the
same honest update, over-representing one honest client's data so a robust rule
drifts towards it under heterogeneity, while the copies look perfectly honest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_number


def mimic_index(honest: Tensor) -> int:
    """The honest row farthest from the mean along the direction ``z`` of largest
    variance: ``argmax_i |<z, x_i - mean>|`` (ties: lowest index).

    With ``X`` the centred rows, ``z`` is the top right-singular vector of ``X`` and
    ``X z = sigma u`` for ``u`` the top eigenvector of the ``[h, h]`` Gram matrix
    ``X X^T``, so ``|u_i|`` ranks the rows without any ``[d, d]`` or SVD work. The
    rule is sign-free, so every colluder picks the same row.
    """
    if honest.shape[0] == 1:
        return 0
    centred = honest.double() - honest.double().mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh(centred @ centred.T)  # ascending eigenvalues
    return int(vecs[:, -1].abs().argmax())


@dataclass(frozen=True, kw_only=True)
class MimicConfig:
    """index: fixed honest row to copy (None: the variance-maximising choice)."""

    index: int | None = None

    def __post_init__(self) -> None:
        check_number(self, "index", lo=0, integer=True, optional=True)


class Mimic(UpdateAttackBase):
    """Copy one honest update. With ``index`` set, copy ``ctx.honest[index]``; else copy
    the honest update that sits farthest along the direction of largest variance.

    The paper estimates that direction over a warm-up phase and tracks it across
    rounds; this attack is stateless, so it recomputes it from the current round's
    honest updates (an SVD of an ``[h, d]`` matrix). Needs the honest updates.
    """

    name = "mimic"
    needs = "omniscient"

    def __init__(self, config: MimicConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        honest = ctx.honest
        idx = self.config.index
        if idx is None:
            idx = mimic_index(honest)
        elif idx >= honest.shape[0]:
            raise ValueError(f"index={idx}: out of range for {honest.shape[0]} honest updates")
        return honest[idx].float().clone()
