"""Seeded, deterministic splits of a training set across nodes.

Every node computes the same partition from the scenario seed (numpy's PCG64
``default_rng`` streams are identical on every platform) and keeps only its own
shard, so no node ever needs another node's indices.

Schemes:

* ``iid``: a seeded shuffle cut into ``num_nodes`` near-equal parts;
* ``dirichlet`` (label skew): for every class, the class's samples (in seeded
  order) are cut among the nodes in proportions drawn from ``Dir(alpha)``; the
  whole draw is repeated until every node holds at least ``min_size`` samples.
  Small ``alpha`` means few classes per node;
* ``quantity`` (quantity skew): node sizes are ``min_size`` plus a
  ``Dir(alpha)`` share of the rest, cut from a seeded shuffle (labels IID).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["SCHEMES", "partition", "shard_for"]

SCHEMES = ("iid", "dirichlet", "quantity")

_BATCH = 16
"""Dirichlet draws tried per vectorised batch."""
_MAX_BATCHES = 1000
"""Give up after ``_BATCH * _MAX_BATCHES`` draws without every node reaching ``min_size``."""


def _as_numpy(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    return labels


def _cut(total: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` along the last axis: floors of the cumulative proportions."""
    bounds = np.floor(np.cumsum(proportions, axis=-1) * total[..., None]).astype(np.int64)
    bounds = np.minimum(bounds, total[..., None])
    bounds[..., -1] = total
    return np.diff(bounds, axis=-1, prepend=0)


def _split_by_owner(order: np.ndarray, owner: np.ndarray, num_nodes: int) -> list[np.ndarray]:
    """Shards from ``owner[i]``, the node of sample ``order[i]``; each shard sorted."""
    sizes = np.bincount(owner, minlength=num_nodes)
    grouped = order[np.argsort(owner, kind="stable")]
    return [np.sort(s) for s in np.split(grouped, np.cumsum(sizes)[:-1])]


def partition(labels: np.ndarray | torch.Tensor, num_nodes: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Disjoint int64 index arrays (sorted) into ``labels``, one per node, covering every sample.

    ``alpha`` is the Dirichlet concentration of ``dirichlet`` and ``quantity``
    (ignored by ``iid``); ``min_size`` the fewest samples any node may get.
    Raises ValueError for an unknown scheme, impossible sizes, or (``dirichlet``)
    when no draw in a bounded number gives every node ``min_size`` samples."""
    labels = _as_numpy(labels)
    n = int(labels.shape[0])
    num_nodes, min_size = int(num_nodes), int(min_size)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_nodes * min_size > n:
        raise ValueError(f"{n} samples cannot give {num_nodes} nodes at least {min_size} each")
    if scheme != "iid" and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_nodes)]

    if scheme == "quantity":
        extra = _cut(np.array(n - num_nodes * min_size), rng.dirichlet(np.full(num_nodes, float(alpha))))
        sizes = extra + min_size
        return [np.sort(s) for s in np.split(rng.permutation(n), np.cumsum(sizes)[:-1])]

    # dirichlet: group a seeded shuffle by class, then cut each class among the nodes
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    per_class = np.bincount(inverse)
    order = rng.permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]
    concentration = np.full(num_nodes, float(alpha))
    for _ in range(_MAX_BATCHES):
        draws = rng.dirichlet(concentration, size=(_BATCH, per_class.shape[0]))  # [B, classes, nodes]
        counts = _cut(np.broadcast_to(per_class, draws.shape[:-1]), draws)
        ok = (counts.sum(axis=1) >= min_size).all(axis=1)
        if ok.any():
            counts = counts[int(np.argmax(ok))]  # [classes, nodes]
            break
    else:
        raise ValueError(f"dirichlet partition: no draw of {_BATCH * _MAX_BATCHES} gave all {num_nodes} nodes "
                         f">= {min_size} samples (alpha={alpha}); raise alpha or lower min_size/num_nodes")
    owner = np.repeat(np.tile(np.arange(num_nodes), counts.shape[0]), counts.reshape(-1))
    return _split_by_owner(order, owner, num_nodes)


def shard_for(dataset, node_index: int, num_nodes: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
              min_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of node ``node_index``'s shard of ``dataset``'s train split (copies)."""
    if not 0 <= int(node_index) < int(num_nodes):
        raise ValueError(f"node_index {node_index} outside [0, {num_nodes})")
    idx = partition(dataset.train_y, num_nodes, scheme, alpha, seed, min_size)[int(node_index)]
    idx_t = torch.from_numpy(idx)
    return dataset.train_x[idx_t], dataset.train_y[idx_t]
