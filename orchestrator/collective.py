"""The aggregation group: the one module that owns ``torch.distributed``.

Each ingest rank holds the rows it received; ``gather_rows`` gives every rank the
whole ``[n, d]`` matrix: first an ``all_gather_into_tensor`` of the per-rank row
counts, then one ``all_gather_into_tensor`` of equal-sized blocks padded to the
largest count (NCCL on CUDA, gloo on CPU: the same two calls on either
backend), from which the padding is dropped. With one rank there is no process
group and nothing to gather. ``group.py`` runs the orchestrator's ranks on top
of these calls; ``shards.py`` splits the defenses' work across them.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


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


def all_gather(out: torch.Tensor, t: torch.Tensor, group) -> None:
    """``all_gather_into_tensor`` (named ``all_gather_single`` from torch 2.13 on): every
    rank's ``t`` into ``out``, concatenated along dim 0 (gloo takes no stacked form)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t, group=group)


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
    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.mpi = None
        """An ``mpigather.MpiGather`` over the same ranks when rows gather through MPI (CPU
        ranks of an ``mpirun`` job, ``aggregation.gather``), else None."""

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
                 timeout_s: float) -> "AggregationGroup":
        """Form generation ``generation`` of the group on a long-lived ``store`` (see
        :func:`open_store`): a re-formed group (after a rank died) is a new generation on
        the same store, under its own key prefix."""
        if world_size == 1:
            return cls(None)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore(f"gen{generation}/", store), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.group.WORLD)

    def reform(self, store: "dist.Store", generation: int, rank: int, world_size: int, device: torch.device,
               timeout_s: float) -> None:
        """Drop the broken process group and join generation ``generation`` (in place, so
        every holder of this object sees the new group)."""
        self.close()
        self.group = AggregationGroup.on_store(store, generation, rank, world_size, device, timeout_s).group

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` from rank ``src`` on every rank (in place; a no-op with one rank)."""
        if self.group is not None:
            dist.broadcast(t, src=src, group=self.group)
        return t

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
        all_gather(all_counts, counts, self.group)
        sizes = all_counts.flatten().tolist()
        cap = max(sizes)
        padded = torch.zeros(cap, d, dtype=rows.dtype, device=rows.device)
        padded[:rows.shape[0]] = rows
        out = torch.empty(w * cap, d, dtype=rows.dtype, device=rows.device)  # (gloo: the concatenated form only)
        all_gather(out, padded, self.group)
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
