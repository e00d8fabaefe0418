"""Defense work split among the aggregation ranks over a ``torch.distributed`` group.

:class:`DistShards` is the multi-rank :class:`orchestrator.defenses.base.Shards`:
after the all-gather of the round's rows every rank holds the whole ``[n, d]``
matrix, and a defense given ``RoundContext(shards=DistShards(group))`` computes
its column span (or its layers) and exchanges the pieces with the two
collectives below, so every rank returns the same result, the one a single rank
would return (see the defenses' docstrings for which parts split and how).

Only ``all_gather_into_tensor`` is used (no pickled objects, no ``*_object``
collectives), the same call on gloo (CPU tensors) and NCCL (CUDA tensors: a CPU
tensor is moved to the group's device for the call and back). Parts are padded
to equal sizes (``all_gather_into_tensor`` needs them) and never empty (gloo
refuses zero-size tensors). Sums are all-gathers added up locally in rank
order rather than ``all_reduce``: the operands are small (``n x n`` Gram
matrices, per-row counts), and the fixed order gives every rank the same bits
whatever algorithm the backend picks, which is what makes every rank select
the same rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .defenses.base import Shards

# Columns below which a rule runs on every rank instead of splitting: one
# collective's latency (~0.1 ms on gloo over loopback) buys about this much work.
MIN_COLUMNS = 1 << 15

# ``all_gather_into_tensor`` under its newer name where torch has it (the old name warns there);
# through ``collective.all_gather``, which seals it when the group seals its collectives.
from .collective import all_gather as _all_gather_into_tensor  # noqa: E402

# Dtypes the backends may lack for collectives: sent as a same-size integer view.
_VIEW_AS = {torch.bool: torch.uint8}


class DistShards(Shards):
    """:class:`Shards` over the process group ``group`` (``None``: the default
    group). ``min_columns``: vectors shorter than this are not split. On NCCL the
    collectives run on ``torch.cuda.current_device()`` at construction (set each
    rank's device first)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, min_columns: int = MIN_COLUMNS) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.min_columns = int(min_columns)
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _all_gather(self, part: torch.Tensor) -> torch.Tensor:
        """``[world_size, *part.shape]``: every rank's ``part`` (same shape everywhere)."""
        home, dtype = part.device, part.dtype
        send = part.to(self.device).contiguous().reshape(-1)  # 1-D: the form every backend takes
        if dtype in _VIEW_AS:
            send = send.view(_VIEW_AS[dtype])
        if send.numel() == 0:
            return torch.empty(self.world_size, *part.shape, dtype=dtype, device=home)
        out = torch.empty(self.world_size * send.numel(), dtype=send.dtype, device=self.device)
        _all_gather_into_tensor(out, send, group=self.group)
        if dtype in _VIEW_AS:
            out = out.view(dtype)
        return out.view(self.world_size, *part.shape).to(home)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._all_gather(t)
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        return acc

    def gather(self, part: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        sizes = [int(s) for s in sizes]
        if part.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: part has {part.shape[0]} rows, sizes say {sizes[self.rank]}")
        cap = max(1, max(sizes))
        if part.shape[0] == cap:
            padded = part
        else:
            padded = torch.zeros(cap, *part.shape[1:], dtype=part.dtype, device=part.device)
            padded[:part.shape[0]] = part
        every = self._all_gather(padded)
        if all(s == cap for s in sizes):
            return every.reshape(cap * self.world_size, *part.shape[1:])
        return torch.cat([every[r, :s] for r, s in enumerate(sizes)])

    def gather_columns(self, block: torch.Tensor, d: int, align: int = 1,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        spans = self.spans(d, align)
        sizes = [b - a for a, b in spans]
        if block.dim() != 1 or block.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank}: block of shape {tuple(block.shape)}, span of {sizes[self.rank]}")
        if out is None:
            out = torch.empty(d, dtype=block.dtype, device=block.device)
        cap = max(sizes)
        direct = (cap > 0 and all(s == cap for s in sizes) and out.is_contiguous() and out.device == self.device
                  and block.dtype not in _VIEW_AS)
        if direct:
            # Equal spans: gathered straight into the output.
            _all_gather_into_tensor(out, block.to(self.device).contiguous(), group=self.group)
            return out
        every = self._all_gather(block if block.shape[0] == cap else
                                 torch.cat([block, block.new_zeros(cap - block.shape[0])]))
        for r, (a, b) in enumerate(spans):
            out[a:b] = every[r, :b - a]
        return out
