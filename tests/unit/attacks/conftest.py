"""Shared fixtures for the attack tests: small deterministic benign deltas and a
fully-populated AttackContext factory."""
from __future__ import annotations

import pytest
import torch

from attacks import AttackContext

D = 40
SLICES = [slice(0, 10), slice(10, 34), slice(34, 40)]  # the middle layer is the largest


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_rule(rows: torch.Tensor) -> torch.Tensor:
    return rows.mean(dim=0)


@pytest.fixture
def d() -> int:
    return D


@pytest.fixture
def slices() -> list[slice]:
    return list(SLICES)


@pytest.fixture
def honest() -> torch.Tensor:
    """Seven honest deltas with a shared positive drift (the honest direction)."""
    return 0.3 + torch.randn(7, D, generator=gen(123))


@pytest.fixture
def make_ctx(honest):
    """Factory: a fully-populated context (n=10, f=3); keyword overrides replace fields."""

    def _make(seed: int = 0, **overrides) -> AttackContext:
        fields = dict(
            n=10, f=3, generator=gen(seed), own=honest[0].clone(), colluders=honest[:3].clone(),
            honest=honest, slices=list(SLICES), round=4,
            global_weights=torch.randn(D, generator=gen(99)), aggregate=mean_rule,
        )
        fields.update(overrides)
        return AttackContext(**fields)

    return _make
