"""The one pairwise-distance routine: everything derives from a Gram matrix.

Every rule that compares updates (Krum, Multi-Krum, Bulyan, GeoMed, RFA, NNM,
centered clipping, STPA, FedSECA's sign concordance) computes ``G = X X^T`` with
one matrix product over the ``[n, d]`` updates (or one per layer: the per-layer
Gram matrices are products of column slices, which are zero-copy views) and then
reads what it needs off the ``n x n`` matrix:

* norms: ``||x_i|| = sqrt(G_ii)``;
* squared Euclidean distance: ``G_ii + G_jj - 2 G_ij``;
* cosine similarity ``G_ij / (||x_i|| ||x_j||)``, defined as 0 when either row
  has zero norm (a zero slice is orthogonal to everything, itself included, so
  a layer every client left untouched ranks nobody ahead of anybody);
* rows rescaled by ``s`` (clipping) without touching ``X``: ``G' = s_i s_j G_ij``.

The ``n x n`` work runs in float64 on the CPU: it is tiny, and it keeps selection
decisions (argmins, sorts, clustering) off the accelerator's launch queue.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import DefenseError

DISTANCES = ("euclidean", "cosine")


def gram(x: torch.Tensor, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
         block: int = 1 << 18) -> torch.Tensor:
    """``x @ x.T`` as an ``[n, n]`` float64 CPU tensor.

    With ``transform`` the Gram matrix of ``transform(x)`` is accumulated over
    column blocks, so the transformed matrix is never materialised in full.
    """
    if transform is None:
        g = x @ x.T
    else:
        n, d = x.shape
        g = torch.zeros(n, n, dtype=x.dtype, device=x.device)
        for c in range(0, d, block):
            t = transform(x[:, c:c + block])
            g.addmm_(t, t.T)
    return g.to("cpu", torch.float64)


def clip_scales(norms: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Per-row factors ``min(1, radius / ||x_i||)`` (1 for zero rows)."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.clamp(radius / safe, max=1.0)


class Geometry:
    """Pairwise quantities of ``n`` rows known only through their Gram matrix ``G``.

    ``scale`` (optional, ``[n]``) describes the rows ``s_i x_i`` instead of ``x_i``.
    """

    def __init__(self, g: torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
        g = g.to("cpu", torch.float64)
        if scale is not None:
            s = scale.to("cpu", torch.float64)
            g = g * s[:, None] * s[None, :]
        self.g = g
        self.n = g.shape[0]
        self.sq_norms = g.diagonal().clamp_min(0.0)
        self.norms = self.sq_norms.sqrt()

    def sq_euclidean(self) -> torch.Tensor:
        d = (self.sq_norms[:, None] + self.sq_norms[None, :] - 2.0 * self.g).clamp_min_(0.0)
        d.fill_diagonal_(0.0)
        return d

    def euclidean(self) -> torch.Tensor:
        return self.sq_euclidean().sqrt_()

    def cosine_similarity(self) -> torch.Tensor:
        inv = torch.where(self.norms > 0, 1.0 / self.norms.clamp_min(1e-300), torch.zeros_like(self.norms))
        return (self.g * inv[:, None] * inv[None, :]).clamp_(-1.0, 1.0)

    def cosine_distance(self) -> torch.Tensor:
        d = 1.0 - self.cosine_similarity()
        d.fill_diagonal_(0.0)
        return d

    def dissimilarity(self, kind: str) -> torch.Tensor:
        """The matrix a distance-based rule ranks by: squared Euclidean (Krum's
        score, Blanchard et al.) or the cosine distance ``1 - cos`` that the
        Layerwise Cosine paper substitutes for it."""
        if kind == "euclidean":
            return self.sq_euclidean()
        if kind == "cosine":
            return self.cosine_distance()
        raise DefenseError(f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)}")
