"""The row store: where accepted update rows live, decoded straight from the wire.

A synchronous round opens the store with its selected nodes in canonical order
(sorted node ids): one ``[n, d]`` float32 buffer is allocated for the round and
node ``i`` owns row ``i``. An upload's chunks are written into its row as they
arrive (no per-upload buffer, no ``torch.stack`` at close). When every selected
node reported, the defense gets the buffer itself; otherwise the reported rows
are moved down in place (canonical order kept) and it gets a view of the first
``k`` rows — never a second ``[n, d]`` copy.

Asynchronous mode opens the store once as a pool of slots (one per node that
can hold an update at once); a slot is claimed at an upload's header, kept
while the update waits in the buffer and released after its aggregation. The
pool reuses the lowest free slot, so the pages it touches stay about the
number of updates held at once.

Writes go through :meth:`Slot.write` under the store's lock; :meth:`seal`
(at a round's close) makes every later write of that round fail, so a straggler
still streaming cannot touch rows the close is compacting. The store decides
nothing about which rows count: the ledger does.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch


class SealedError(RuntimeError):
    """A write arrived after the store's round was sealed (closed)."""


class Slot:
    """One node's row: a flat float32 view and a writer for its raw little-endian bytes."""

    def __init__(self, store: "RowStore", generation: int, index: int, node_id: str) -> None:
        self.store, self.generation, self.index, self.node_id = store, generation, index, node_id
        self.row = store._buf[index]
        self._bytes = memoryview(self.row.numpy()).cast("B")

    def write(self, offset: int, data: bytes) -> None:
        with self.store._lock:
            if self.store._generation != self.generation or self.store._sealed:
                raise SealedError(f"row of {self.node_id} belongs to a closed round")
            self._bytes[offset:offset + len(data)] = data


class RowStore:
    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        if torch.device(device).type != "cpu":
            raise ValueError("rows are decoded on the host; the pipeline moves them to the aggregation device")
        self.d = d
        self._lock = threading.Lock()
        self._buf = torch.empty(0, d, dtype=torch.float32)
        self._generation = 0
        self._sealed = False
        self._fixed: dict[str, int] = {}  # sync: node -> its row
        self._held: dict[str, int] = {}  # node -> row it holds now
        self._free: list[int] = []  # async pool: free rows, lowest first

    # ----- opening ---------------------------------------------------------------
    def open_round(self, order: Sequence[str]) -> None:
        """A fresh ``[len(order), d]`` buffer; node ``order[i]`` owns row ``i``."""
        with self._lock:
            self._generation += 1
            self._sealed = False
            self._buf = torch.empty(len(order), self.d, dtype=torch.float32)
            self._fixed = {n: i for i, n in enumerate(order)}
            self._held, self._free = {}, []

    def open_pool(self, capacity: int) -> None:
        """A pool of ``capacity`` slots, claimed in any order (async mode)."""
        with self._lock:
            self._generation += 1
            self._sealed = False
            self._buf = torch.empty(capacity, self.d, dtype=torch.float32)
            self._fixed, self._held = {}, {}
            self._free = list(range(capacity))

    # ----- ingest ---------------------------------------------------------------
    def claim(self, node_id: str) -> Slot:
        """The row ``node_id`` writes its upload into (its fixed row, or a free pool slot)."""
        with self._lock:
            if self._sealed:
                raise SealedError("the round's rows are sealed")
            if node_id in self._held:
                raise RuntimeError(f"{node_id} already holds a row")  # the ledger allows one upload at a time
            if self._fixed:
                index = self._fixed[node_id]
            elif self._free:
                index = self._free.pop(0)
            else:
                raise RuntimeError("row pool exhausted")  # capacity = the most updates held at once
            self._held[node_id] = index
            return Slot(self, self._generation, index, node_id)

    def release(self, node_id: str) -> None:
        """Give a row back (a refused or broken upload, or an aggregated async update)."""
        with self._lock:
            index = self._held.pop(node_id, None)
            if index is not None and not self._fixed:
                self._free.append(index)
                self._free.sort()

    def row(self, node_id: str) -> torch.Tensor:
        """A view of the row ``node_id`` holds (for the simulation-only adversary view)."""
        with self._lock:
            return self._buf[self._held[node_id]]

    # ----- close ------------------------------------------------------------------
    def seal(self) -> None:
        """No more writes to this round's rows (uploads still in flight fail)."""
        with self._lock:
            self._sealed = True

    def take(self, node_ids: Sequence[str]) -> torch.Tensor:
        """The rows of ``node_ids`` (in that order) as one ``[k, d]`` tensor.

        Sync (sealed, ``node_ids`` in canonical order): the buffer itself or a view of its
        first ``k`` rows after an in-place compaction. Async pool: a gathered copy (the
        slots stay held until :meth:`release`)."""
        with self._lock:
            idx = [self._held[n] for n in node_ids]
            if not self._fixed:
                return self._buf.index_select(0, torch.tensor(idx, dtype=torch.long))
            if not self._sealed:
                raise RuntimeError("seal the round before taking its rows")
            if any(b <= a for a, b in zip(idx, idx[1:])):
                raise ValueError("take() needs the rows in canonical (ascending) order")
            for dst, src in enumerate(idx):  # ascending, so a source is never overwritten before it moves
                if dst != src:
                    self._buf[dst].copy_(self._buf[src])
            return self._buf[:len(idx)]

    def drop(self) -> None:
        """Free the buffer (after the round's aggregation)."""
        with self._lock:
            self._buf = torch.empty(0, self.d, dtype=torch.float32)
            self._fixed, self._held, self._free = {}, {}, []
            self._generation += 1

    @property
    def capacity(self) -> int:
        return self._buf.shape[0]

    def holder(self, index: int) -> Optional[str]:
        with self._lock:
            return next((n for n, i in self._held.items() if i == index), None)
