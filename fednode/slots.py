"""Machine-local training slots: at most N node processes compute at once.

Twenty selected nodes training at once on a 2-core machine thrash: every one of
them is slow and all finish late together. A node therefore computes (imports
torch, loads its shard, trains, crafts its attack's update) only while it holds
one of ``N`` slots; the others wait, holding no CPU. Slot ``i`` is an exclusive
``fcntl.flock`` on ``DIR/slot-i.lock``; the kernel releases it when the holder
exits or dies (SIGKILL included), so a crashed node never leaks its slot.

The launcher passes ``--train-slots N --slot-dir RUN_DIR/train-slots`` (N: the
scenario's ``federation.train_slots``, 0 meaning the machine's cores) to every
node it starts; nodes started by hand on one machine can share a directory.
Waiting uses short polls with a random start slot, so no queue state exists
anywhere that a dead process could corrupt.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("fednode.slots")


def default_slots() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class TrainSlots:
    def __init__(self, directory: str | os.PathLike, n: int, poll: float = 0.02) -> None:
        if n < 1:
            raise ValueError(f"train slots must be >= 1, got {n}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.poll = poll
        self.waited = 0.0  # seconds spent waiting in the last hold()

    def _try(self, i: int) -> Optional[int]:
        fd = os.open(self.dir / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Block until a slot is free; hold it for the ``with`` body."""
        t0 = time.monotonic()
        delay, fd = self.poll, None
        while fd is None:
            start = random.randrange(self.n)
            for k in range(self.n):
                fd = self._try((start + k) % self.n)
                if fd is not None:
                    break
            else:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(0.2, delay * 1.5)
        self.waited = time.monotonic() - t0
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class NoSlots:
    """No limit (the default for a node started by hand without ``--train-slots``)."""

    n = 0
    waited = 0.0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        yield None
