"""Choosing a round's participants from the nodes that are alive."""
from __future__ import annotations

import math

import torch


def select(alive: list[str], mode: str, sample_size: int, generator: torch.Generator,
           over_selection: float = 1.0) -> list[str]:
    """``all``: every alive node (cross-silo). ``sample``: a uniform sample of
    ``ceil(sample_size * over_selection)`` alive nodes (cross-device), or all of
    them when fewer are alive. ``alive`` is sorted first so the draw depends only
    on the generator and the membership, not on arrival order."""
    alive = sorted(alive)
    if mode == "all":
        return alive
    if mode != "sample":
        raise ValueError(f"unknown selection mode {mode!r}; allowed: 'all', 'sample'")
    k = min(len(alive), math.ceil(sample_size * over_selection))
    idx = torch.randperm(len(alive), generator=generator)[:k].tolist()
    return sorted(alive[i] for i in idx)
