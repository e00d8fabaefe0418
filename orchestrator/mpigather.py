"""Gathering update rows across CPU ranks with MPI instead of gloo.

Each aggregation rank holds ``n_r`` rows of ``d`` values and every rank needs the
whole ``[sum n_r, d]`` matrix. :meth:`.collective.AggregationGroup.gather_rows`
does it with gloo's ``all_gather_into_tensor``, which on CPU moves the bytes
through TCP sockets; Open MPI moves them through shared memory between ranks on
one machine (and its own transports between machines). :class:`MpiGather` has
the same ``gather_rows`` contract on an mpi4py communicator:

1. ``Allgather`` of a three-word header per rank (row count, ``d``, element
   size), so ranks that disagree on the shape fail together instead of hanging;
2. one ``Allgatherv`` of the rows, received straight into a preallocated torch
   tensor: the send and receive buffers are numpy views of the tensors' memory
   (``Tensor.numpy``), no copy and no pickle. The MPI datatype is one row of
   bytes, so counts and displacements are row counts (no 2^31-element limit on
   the matrix) and any dtype travels as it is.

With a ``sealer`` (the group seals its collectives: ``security.rank_encryption`` or
TLS) each rank's rows cross as one AES-GCM frame instead (``ranksec``), byte counts
then (under 2^31 bytes in all).

Uneven counts need no padding (a rank with zero rows sends nothing). With no
communicator (``comm=None``, one rank) ``gather_rows`` returns the rows
themselves, as the gloo group does without a process group.

:func:`choose_gather` times the candidate gathers on a sample buffer on every
rank and returns the name of the fastest (the same on every rank). ``bench/gather.py``
measures both paths; BENCHMARKS.md has the figures.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional, Protocol

import numpy as np
import torch

HEADER = 3  # int64 words per rank: rows, d, element size


class Gatherer(Protocol):
    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]: ...


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    """The memory of a contiguous tensor as a flat uint8 numpy array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class MpiGather:
    """``gather_rows`` over an mpi4py communicator (CPU tensors only)."""

    def __init__(self, comm: Optional[Any], sealer: Optional[Any] = None) -> None:
        self.comm = comm
        self._row_types: dict[int, Any] = {}
        self.sealer = sealer
        """A :class:`~orchestrator.ranksec.Sealer` (the group's, when it seals its
        collectives): each rank's rows then cross as one AES-GCM frame (:meth:`_sealed`)."""

    @property
    def world_size(self) -> int:
        return 1 if self.comm is None else self.comm.Get_size()

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.Get_rank()

    def gather_rows(self, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[int]]:
        """All ranks' ``[n_r, d]`` rows as one ``[sum n_r, d]`` matrix (rank order), and
        each rank's count. Every rank must pass rows of the same ``d`` and dtype.

        ``out`` (optional): a contiguous CPU tensor to receive the matrix, e.g. one
        kept from round to round; it must have ``sum n_r`` rows. A fresh matrix is
        a fresh mapping whose first touch costs ~0.5 ms per MB here (42 ms for
        80 MB, ten times the copy itself), which a kept one pays once."""
        if self.comm is None:
            return rows, [rows.shape[0]]
        if rows.dim() != 2:
            raise ValueError(f"rows must be [n, d], got shape {tuple(rows.shape)}")
        if rows.device.type != "cpu":
            raise ValueError(f"MpiGather takes CPU tensors, got {rows.device}")
        rows = rows.contiguous()
        n_r, d = rows.shape
        size = rows.element_size()
        w = self.comm.Get_size()
        mine = np.array([n_r, d, size], dtype=np.int64)
        header = np.empty(w * HEADER, dtype=np.int64)
        self.comm.Allgather(mine, header)
        header = header.reshape(w, HEADER)
        if (header[:, 1] != d).any() or (header[:, 2] != size).any():
            raise ValueError(f"ranks disagree on the rows' width or element size: {header[:, 1:].tolist()}")
        sizes = header[:, 0].tolist()
        if out is None:
            out = torch.empty(sum(sizes), d, dtype=rows.dtype)
        elif (out.shape != (sum(sizes), d) or out.dtype != rows.dtype or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous CPU {rows.dtype} tensor of shape {(sum(sizes), d)}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        row_bytes = d * size
        if self.sealer is not None:
            return self._sealed(rows, out, sizes, row_bytes, header), sizes
        if row_bytes == 0 or out.shape[0] == 0:
            return out, sizes
        row = self._row_type(row_bytes)
        displs = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64).tolist()
        self.comm.Allgatherv([_bytes_view(rows), n_r, row], [_bytes_view(out), (sizes, displs), row])
        return out, sizes

    def _sealed(self, rows: torch.Tensor, out: torch.Tensor, sizes: list[int], row_bytes: int,
                header: np.ndarray) -> torch.Tensor:
        """The sealed gather: each rank's rows as one frame (``ranksec``; its associated
        data binds the generation, this op and the sender, the header's shape with the
        payload's size), ``Allgatherv``-ed as bytes, every other rank's frame opened into
        its rows of ``out``. The header travelled in the clear; a frame whose size it
        misstates does not open."""
        from .ranksec import sealed_size

        s = self.sealer
        op = s.next_op()
        me, w = self.comm.Get_rank(), self.comm.Get_size()
        frame_sizes = [sealed_size(n * row_bytes) for n in sizes]
        if sum(frame_sizes) >= 1 << 31:
            raise ValueError(f"a sealed MPI gather of {sum(frame_sizes)} bytes is over MPI's 2^31-byte count limit; "
                             "gather through gloo (aggregation.gather = 'gloo')")
        mine = s.seal(_bytes_view(rows), op, b"M")
        frames = np.empty(sum(frame_sizes), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(frame_sizes[:-1])]).astype(np.int64).tolist()
        from mpi4py import MPI

        self.comm.Allgatherv([mine, MPI.BYTE], [frames, (frame_sizes, displs), MPI.BYTE])
        into = _bytes_view(out)
        at = 0
        for r in range(w):
            nb = sizes[r] * row_bytes
            part = into[at:at + nb]
            if r == me:
                part[:] = _bytes_view(rows)
            else:
                s.open(frames[displs[r]:displs[r] + frame_sizes[r]], r, op, b"M", nb, out=part)
            at += nb
        return out

    def _row_type(self, row_bytes: int) -> Any:
        """A committed MPI datatype of ``row_bytes`` contiguous bytes (cached)."""
        t = self._row_types.get(row_bytes)
        if t is None:
            from mpi4py import MPI

            t = self._row_types[row_bytes] = MPI.BYTE.Create_contiguous(row_bytes).Commit()
        return t

    def close(self) -> None:
        """Free the cached datatypes (the communicator stays the caller's)."""
        for t in self._row_types.values():
            t.Free()
        self._row_types.clear()


def choose_gather(candidates: Mapping[str, Gatherer], rows_like: torch.Tensor, repeats: int = 3) -> str:
    """The name of the fastest of ``candidates`` (e.g. ``{"gloo": group, "mpi":
    MpiGather(comm)}``) at gathering ``rows_like``-shaped rows, the same name on
    every rank.

    A collective call: every rank calls it with the same names in the same order
    and its own ``rows_like`` (its sample rows; its real share of a round's rows
    is the best sample). Each candidate gathers once to warm up (connections,
    buffers), then ``repeats`` times; a rank's time for it is its best call. A
    gather takes as long as its slowest rank, so the ranks' times are gathered
    (through the first candidate) and the candidate whose slowest rank is fastest
    wins, the first listed on a tie.
    """
    names = list(candidates)
    if not names:
        raise ValueError("choose_gather needs at least one candidate")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if len(names) == 1:
        return names[0]
    best = []
    for name in names:
        gather = candidates[name].gather_rows
        gather(rows_like)
        t = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            gather(rows_like)
            t = min(t, time.perf_counter() - t0)
        best.append(t)
    everyone, _ = candidates[names[0]].gather_rows(torch.tensor([best], dtype=torch.float64))
    return names[int(torch.argmin(everyone.max(0).values))]
