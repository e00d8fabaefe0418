"""Checkpoints: everything needed to resume a run, written atomically.

Only tensors, numbers, strings and containers of them are saved, and they are
loaded with ``weights_only=True``: no arbitrary unpickling.

A checkpoint is written to a temporary file beside it, flushed to the disk
(``fsync``), and renamed over the old one (``os.replace``, atomic on POSIX), then
the folder is synced: a kill at any moment leaves either the old checkpoint or the
new one, never a torn file. :func:`load` refuses, with a message naming the file and
what is wrong, a file that is not a readable checkpoint (truncated, corrupt) or
that another run wrote (:func:`check_matches`).

No random-number state is saved: every draw of a run comes from a generator seeded
by ``(seed, purpose, round, ...)`` (``proto.seeding``), so the next round's draws
are the same whether the run was interrupted or not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from proto import files

from . import failpoints

FORMAT = "byzfed-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (unreadable, or another run's)."""


def save(path: Path, payload: dict[str, Any]) -> None:
    files.save(path, {"format": FORMAT, **payload},
               before_replace=lambda: failpoints.reached("checkpoint", int(payload.get("next_round", -1)) - 1))


def load(path: Path) -> dict[str, Any]:
    ck = files.load(path, CheckpointError, "checkpoint", "move it away to start the run afresh")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path} is not a byzfed checkpoint (format {got!r}, expected {FORMAT!r})")
    return ck


def check_matches(path: Path, ck: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written by another run: each key of ``expected`` (scenario
    name, seed, defense, model layout, ...) must hold the same value in ``ck``."""
    for key, want in expected.items():
        got = ck.get(key)
        if got != want:
            raise CheckpointError(f"{path} was written by another run: its {key} is {got!r}, this run's is "
                                  f"{want!r}; pass another --run-dir (or move the checkpoint away)")
