"""The aggregation group: the one module that owns ``torch.distributed``.

Each ingest rank holds the rows it received; ``gather_rows`` gives every rank the
whole ``[n, d]`` matrix: first an ``all_gather_into_tensor`` of the per-rank row
counts, then one ``all_gather_into_tensor`` of equal-sized blocks padded to the
largest count (NCCL on CUDA, gloo on CPU: the same two calls on either
backend), from which the padding is dropped. With one rank there is no process
group and nothing to gather. ``group.py`` runs the orchestrator's ranks on top
of these calls; ``shards.py`` splits the defenses' work across them.

Sealed collectives (``security.tls``/``mtls`` or ``security.rank_encryption``): a group
formed with a :class:`~orchestrator.ranksec.Sealer` and ``encrypt`` seals every payload it
sends (:meth:`AggregationGroup.broadcast_`, :func:`all_gather`, hence ``gather_rows`` and
``shards.DistShards``) as a uint8 AES-GCM frame and opens what it receives; the frames
cross the same gloo/NCCL calls (on CUDA the sealing runs on CPU copies). Without
``encrypt`` the calls are the plain ones, untouched.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .ranksec import Sealer, byte_view, sealed_size


def local_rank() -> int:
    """This process's rank among the ranks on its machine (torchrun, Open MPI, Slurm), or 0."""
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def pick_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """The aggregation device: with CUDA, one device per rank on a machine, chosen by
    local rank (``local_rank()`` when not given)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("aggregation.device = 'cuda' but no CUDA device is available")
        index = (local_rank() if local_rank is None else local_rank) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_sealing: Optional[tuple[Any, Sealer]] = None
"""(process group, sealer) while a group that seals its collectives is formed: the
collectives of :func:`all_gather` on that group (``shards.DistShards`` included) seal."""


_REGISTERED: Any = object()


def all_gather(out: torch.Tensor, t: torch.Tensor, group, sealer: Optional[Sealer] = _REGISTERED) -> None:
    """``all_gather_into_tensor`` (named ``all_gather_single`` from torch 2.13 on): every
    rank's ``t`` into ``out``, concatenated along dim 0 (gloo takes no stacked form).
    Sealed by ``sealer`` (None: not sealed); not given: by the sealing group's when
    ``group`` (None: the default group) is that group (``shards.DistShards``)."""
    if sealer is _REGISTERED:
        sealing = _sealing
        sealer = sealing[1] if sealing is not None and (group is None or group is sealing[0]) else None
    if sealer is not None:
        sealed_all_gather(sealer, out, t, group)
        return
    _all_gather_into_tensor(out, t, group=group)


def _cpu_bytes(t: torch.Tensor) -> np.ndarray:
    """``t``'s bytes as a flat uint8 array on the CPU (a view when ``t`` is a contiguous CPU tensor)."""
    return byte_view(t.detach().contiguous().cpu())


def _write_bytes(dst: torch.Tensor, data: np.ndarray) -> None:
    """Fill ``dst`` (any device, contiguous) from the flat bytes ``data``."""
    src = torch.from_numpy(data).view(dst.dtype).view(dst.shape)
    if dst.device.type == "cpu":
        dst.copy_(src)
    else:
        dst.copy_(src.to(dst.device))


def sealed_all_gather(sealer: Sealer, out: torch.Tensor, t: torch.Tensor, group) -> None:
    """:func:`all_gather` of sealed frames: each rank seals its ``t``, the frames are
    all-gathered as uint8, every other rank's is opened into its place in ``out``
    (:class:`~orchestrator.ranksec.SealError` when one does not open)."""
    w, me = dist.get_world_size(group), dist.get_rank(group)
    op = sealer.next_op()
    mine = _cpu_bytes(t)
    nb = int(mine.size)
    size = sealed_size(nb)
    if out.numel() * out.element_size() != w * nb:
        raise ValueError(f"all_gather: out holds {out.numel() * out.element_size()} bytes, {w} x {nb} expected")
    frame = torch.from_numpy(sealer.seal(mine, op, b"G"))
    frames = torch.empty(w * size, dtype=torch.uint8, device=t.device)
    _all_gather_into_tensor(frames, frame.to(t.device), group=group)
    frames_np = frames.cpu().numpy()
    direct = out.device.type == "cpu" and out.is_contiguous()
    into = byte_view(out) if direct else np.empty(w * nb, dtype=np.uint8)
    for r in range(w):
        part = into[r * nb:(r + 1) * nb]
        if r == me:
            part[:] = mine
        else:
            sealer.open(frames_np[r * size:(r + 1) * size], r, op, b"G", nb, out=part)
    if not direct:
        _write_bytes(out, into)


def open_store(rendezvous: str, is_leader: bool, timeout_s: float) -> "dist.Store":
    """The group's key-value store at ``tcp://host:port`` (rank 0 hosts it): the rendezvous
    of every generation of the process group, and the survivors' roll call after a rank
    died (``group.py``). Values are plain bytes."""
    if not rendezvous.startswith("tcp://"):
        raise ValueError(f"rendezvous {rendezvous!r} must be tcp://host:port")
    host, _, port = rendezvous[len("tcp://"):].rpartition(":")
    return dist.TCPStore(host.strip("[]"), int(port), None, is_leader, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class AggregationGroup:
    def __init__(self, group: Optional[dist.ProcessGroup] = None, sealer: Optional[Sealer] = None,
                 encrypt: bool = False) -> None:
        self.group = group
        self.mpi = None
        """An ``mpigather.MpiGather`` over the same ranks when rows gather through MPI (CPU
        ranks of an ``mpirun`` job, ``aggregation.gather``), else None."""
        self.sealer = sealer
        """This generation's :class:`~orchestrator.ranksec.Sealer` (a group formed with the
        run's group secret), else None. It seals the run's key always, the other payloads
        when ``encrypt``."""
        self.encrypt = bool(encrypt and sealer is not None and group is not None)
        self._activate()

    def _activate(self) -> None:
        global _sealing
        if self.encrypt:
            _sealing = (self.group, self.sealer)
        elif _sealing is not None and _sealing[0] is self.group:
            _sealing = None

    @property
    def sealing(self) -> bool:
        """Whether this group's collectives are sealed."""
        return self.encrypt and self.group is not None

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    @classmethod
    def init(cls, rank: int, world_size: int, init_method: str, device: torch.device,
             timeout_s: float = 120.0) -> "AggregationGroup":
        """Join the group at ``init_method`` (``tcp://host:port``, rank 0 hosts it): NCCL
        when ranks hold CUDA devices, gloo otherwise. Every collective (and the
        rendezvous) fails after ``timeout_s`` instead of hanging on a dead rank."""
        if world_size == 1:
            return cls(None)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.group.WORLD)

    @classmethod
    def on_store(cls, store: "dist.Store", generation: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, prefix: str = "", sealer: Optional[Sealer] = None,
                 encrypt: bool = False) -> "AggregationGroup":
        """Form generation ``generation`` of the group on a long-lived ``store`` (see
        :func:`open_store`): a re-formed group (after a rank died) is a new generation on
        the same store, under its own key prefix (``gen<g>/<prefix>/``: the prefix derives
        from the group secret, ``group.Roster``). ``sealer``/``encrypt``: see the class."""
        if world_size == 1:
            return cls(None, sealer)
        backend = "nccl" if device.type == "cuda" else "gloo"
        name = f"gen{generation}/{prefix}/" if prefix else f"gen{generation}/"
        dist.init_process_group(backend, store=dist.PrefixStore(name, store), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.group.WORLD, sealer, encrypt)

    def adopt(self, other: "AggregationGroup") -> None:
        """Take ``other``'s process group and sealer (a re-formed generation), in place, so
        every holder of this object sees the new group."""
        self.group, self.sealer, self.encrypt = other.group, other.sealer, other.encrypt
        self._activate()

    def broadcast_(self, t: torch.Tensor, src: int = 0, sealed: Optional[bool] = None) -> torch.Tensor:
        """``t`` from rank ``src`` on every rank (in place; a no-op with one rank). Sealed
        when the group seals; ``sealed=True``: sealed whatever ``encrypt`` says (the run's
        key, ``group.form``; needs a sealer), ``False``: plain."""
        if self.group is None:
            return t
        if not (self.sealing if sealed is None else sealed):
            dist.broadcast(t, src=src, group=self.group)
            return t
        if self.sealer is None:
            raise RuntimeError("a sealed broadcast needs the group secret (this group was formed without one)")
        self._sealed_broadcast(t, src, b"B" if sealed is None else b"K")
        return t

    def _sealed_broadcast(self, t: torch.Tensor, src: int, kind: bytes) -> None:
        s = self.sealer
        op = s.next_op()
        nb = t.numel() * t.element_size()
        size = sealed_size(nb)
        if self.rank == src:
            frame = torch.from_numpy(s.seal(_cpu_bytes(t), op, kind)).to(t.device)
        else:
            frame = torch.empty(size, dtype=torch.uint8, device=t.device)
        dist.broadcast(frame, src=src, group=self.group)
        if self.rank != src:
            frame_np = frame.cpu().numpy()
            if t.device.type == "cpu" and t.is_contiguous():
                s.open(frame_np, src, op, kind, nb, out=byte_view(t))
            else:
                _write_bytes(t, s.open(frame_np, src, op, kind, nb))

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """All ranks' ``[n_r, d]`` rows as one ``[sum n_r, d]`` matrix, and each rank's count
        (any dtype: the group also gathers its int64 control tables this way)."""
        if self.group is None:
            return rows, [rows.shape[0]]
        if self.mpi is not None and rows.device.type == "cpu":
            return self.mpi.gather_rows(rows)
        return self.gloo_gather_rows(rows)

    def gloo_gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """:meth:`gather_rows` through the process group (gloo or NCCL), whatever ``mpi`` says."""
        d = rows.shape[1]
        w = self.world_size
        counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        all_counts = torch.empty(w, dtype=torch.int64, device=rows.device)
        sealer = self.sealer if self.sealing else None
        all_gather(all_counts, counts, self.group, sealer)
        sizes = all_counts.flatten().tolist()
        cap = max(sizes)
        padded = torch.zeros(cap, d, dtype=rows.dtype, device=rows.device)
        padded[:rows.shape[0]] = rows
        out = torch.empty(w * cap, d, dtype=rows.dtype, device=rows.device)  # (gloo: the concatenated form only)
        all_gather(out, padded, self.group, sealer)
        if all(s == cap for s in sizes):
            return out, sizes
        keep = torch.cat([torch.arange(r * cap, r * cap + s, device=rows.device) for r, s in enumerate(sizes)])
        return out.index_select(0, keep), sizes

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # (a broken group may fail to shut down cleanly; it is gone either way)
                pass
        self.group = None
        self.mpi = None  # (an MPI communicator with a dead rank is not used again)
        global _sealing
        if self.encrypt and _sealing is not None and _sealing[1] is self.sealer:
            _sealing = None
        self.sealer, self.encrypt = None, False
