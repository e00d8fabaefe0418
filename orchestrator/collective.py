"""The aggregation group: the one module that owns ``torch.distributed``.

Each ingest rank holds the rows it received; ``gather_rows`` gives every rank the
whole ``[n, d]`` matrix: first an ``all_gather_into_tensor`` of the per-rank row
counts, then one ``all_gather_into_tensor`` of equal-sized blocks padded to the
largest count (NCCL on CUDA, gloo on CPU: the same two calls on either
backend), from which the padding is dropped. With one rank there is no process
group and nothing to gather. The orchestrator runs one rank today
(``aggregation.ranks = 1``); the multi-rank group is the next step of the design.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("aggregation.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class AggregationGroup:
    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    @classmethod
    def init(cls, rank: int, world_size: int, init_method: str, device: torch.device) -> "AggregationGroup":
        if world_size == 1:
            return cls(None)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        return cls(dist.group.WORLD)

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """All ranks' ``[n_r, d]`` rows as one ``[sum n_r, d]`` matrix, and each rank's count."""
        if self.group is None:
            return rows, [rows.shape[0]]
        d = rows.shape[1]
        counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        all_counts = torch.empty(self.world_size, dtype=torch.int64, device=rows.device)
        dist.all_gather_into_tensor(all_counts, counts, group=self.group)
        sizes = all_counts.tolist()
        cap = max(sizes)
        padded = torch.zeros(cap, d, dtype=rows.dtype, device=rows.device)
        padded[:rows.shape[0]] = rows
        out = torch.empty(self.world_size * cap, d, dtype=rows.dtype, device=rows.device)
        dist.all_gather_into_tensor(out, padded, group=self.group)
        keep = torch.cat([torch.arange(r * cap, r * cap + s, device=rows.device) for r, s in enumerate(sizes)])
        return out.index_select(0, keep), sizes

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
