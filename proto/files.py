"""Tensor files written atomically and read without unpickling code (checkpoints, node state).

``save`` writes beside the target, flushes to the disk (``fsync``), renames over the old file
(``os.replace``, atomic on POSIX) and syncs the folder: a kill at any moment leaves the old
file or the new one, never a torn one. ``load`` reads with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only) and turns every way a file can be unreadable
into the caller's error class, with a message naming the file.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional


def sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, payload: Any, before_replace: Optional[Callable[[], None]] = None) -> None:
    """``payload`` to ``path`` atomically; ``before_replace`` runs between the write and the
    rename (a test hook: a kill there must leave the old file whole)."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    sync_dir(path.parent)


def load(path: Path, error: type[Exception], what: str, hint: str) -> Any:
    """The object in ``path``; ``error(f"{path} is not a readable {what} (...); {hint}")`` when
    the file is truncated, corrupt or not a torch file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise error(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:200]}); {hint}") from None
