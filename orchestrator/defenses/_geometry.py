"""The one pairwise-distance routine: everything derives from a Gram matrix.

Every rule that compares updates (Krum, Multi-Krum, Bulyan, GeoMed, RFA, NNM,
centered clipping, STPA) computes ``G = X X^T`` with one matrix product over the
``[n, d]`` updates (or one per layer: the per-layer Gram matrices are products
of column slices, which are zero-copy views) and then reads what it needs off
the ``n x n`` matrix (FedSECA's sign concordance is the Gram matrix of
``sign(X)``, summed over column blocks by :func:`blocked_gram`):

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

import functools
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .base import DefenseError

if TYPE_CHECKING:
    from ._order import Scratch

DISTANCES = ("euclidean", "cosine")


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` (one matrix product) as an ``[n, n]`` float64 CPU tensor."""
    return (x @ x.T).to("cpu", torch.float64)


def blocked_gram(x: torch.Tensor, transform: Callable[[torch.Tensor, "Scratch"], torch.Tensor],
                 visit: Optional[Callable[[torch.Tensor, "Scratch"], Any]] = None) -> tuple[torch.Tensor, list[Any]]:
    """The Gram matrix of ``transform(x)``, accumulated over column blocks on the
    worker threads so that the transformed matrix is never materialised; also
    ``[visit(block, scratch) for each raw block]``, for rules that need other per-column
    statistics from the same pass over the matrix (FedSECA). Per-block products
    are exact for sign matrices (integer sums below 2^24) and summed in float64.
    Both take the worker's :class:`._order.Scratch` for block-sized temporaries
    (``transform``'s result may live there). A ``transform`` may return int8 (see :func:`int8_products`): the block
    products then run as int8 x int8 -> int32 matrix products, exact as well.
    """
    from ._order import abs_block_width, map_column_blocks

    def one(block: torch.Tensor, ws: Scratch) -> tuple[torch.Tensor, Any]:
        t = transform(block, ws)
        g = torch._int_mm(t, t.T) if t.dtype == torch.int8 else t @ t.T
        return g.to(torch.float64), (None if visit is None else visit(block, ws))

    parts = map_column_blocks(x, one, abs_block_width(x.shape[0]))
    g = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for pg, _ in parts:
        g += pg
    return g.cpu(), [v for _, v in parts]


def int8_products(n: int, device: torch.device) -> bool:
    """Whether small-integer Gram products of ``n`` rows are faster in int8 here.

    On CPU, ``torch._int_mm`` (int8 x int8 -> int32) beats float32 GEMM from about
    48 rows on (0.58x the time at n = 100 on the 2-core AVX-512 VM of
    BENCHMARKS.md, 1.5x slower at n = 20); elsewhere float32 is used.
    """
    return device.type == "cpu" and n >= 48 and _int_mm_works()


@functools.lru_cache(maxsize=1)
def _int_mm_works() -> bool:
    try:
        a = torch.ones(48, 64, dtype=torch.int8)
        return bool(torch._int_mm(a, a.T)[0, 0] == 64)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


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
