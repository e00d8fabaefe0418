"""A node's local-algorithm state on its own disk (``fednode --state-dir DIR``).

FedDyn's ``h_i`` and FedSpeed's ``g^_i`` live in the node process; a node that dies
with its orchestrator (a crash, a kill) would start again from zeros and the resumed
run would leave the uninterrupted one. With a state folder the node keeps the state
there instead, one file per round it trained:

* after training round ``R`` it writes ``state-<R>.pt`` (``torch.save`` of a dict of
  strings, numbers and tensors only) to a temporary file, ``fsync``s it, renames it
  over the final name (``os.replace``: atomic) and syncs the folder, so a kill at any
  moment leaves whole files only;
* asked to train round ``R`` it loads the newest file of a round ``< R`` (with
  ``weights_only=True``: no arbitrary unpickling) and deletes the files of rounds
  ``>= R``: they belong to a timeline the orchestrator rolled back (it was killed
  and resumed from a checkpoint taken before them), so a round run again after a
  kill starts from the state it started from the first time;
* it keeps the newest file of a round before ``keep_from`` (the first round the
  orchestrator would run again after a kill: its last checkpoint's next round, sent
  in each task as ``checkpoint_round``) and every later one; with a checkpoint after
  every round these are the last two.

A file written for another node name or algorithm, or one that is not a readable
state file, is refused with :class:`NodeStateError` naming the file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from proto import files

FORMAT = "byzfed-node-state/1"
_FILE = re.compile(r"^state-(\d+)\.pt$")


class NodeStateError(RuntimeError):
    """A state file that cannot be used (unreadable, or another node's or algorithm's)."""


class NodeStateStore:
    def __init__(self, folder: str | os.PathLike, name: str) -> None:
        self.dir = Path(folder)
        self.name = name

    def rounds(self) -> list[int]:
        """The rounds that have a state file, oldest first."""
        out = []
        if not self.dir.is_dir():
            return out
        for p in self.dir.iterdir():
            m = _FILE.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, round_id: int) -> Path:
        return self.dir / f"state-{round_id}.pt"

    def load_before(self, round_id: int, algorithm: str) -> tuple[dict[str, Any], int]:
        """``(state, round)``: the state after the newest round ``< round_id`` this node
        trained (``({}, -1)`` when none: a new node starts from zeros). Files of rounds
        ``>= round_id`` are deleted (a rolled-back timeline)."""
        rounds = self.rounds()
        for r in rounds:
            if r >= round_id:
                self.path(r).unlink(missing_ok=True)
        older = [r for r in rounds if r < round_id]
        if not older:
            return {}, -1
        path = self.path(older[-1])
        blob = files.load(path, NodeStateError, "node state file", "move it away to start this node's state afresh")
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise NodeStateError(f"{path} is not a byzfed node state file (format {got!r}, expected {FORMAT!r})")
        for key, want in (("name", self.name), ("algorithm", algorithm), ("round", older[-1])):
            if blob.get(key) != want:
                raise NodeStateError(f"{path} was written by another node or run: its {key} is {blob.get(key)!r}, "
                                     f"this node's is {want!r}; pass another --state-dir (or move the file away)")
        state = blob.get("state")
        if not isinstance(state, dict):
            raise NodeStateError(f"{path} holds no state dict")
        return dict(state), older[-1]

    def save(self, round_id: int, algorithm: str, state: dict[str, Any], keep_from: int | None = None) -> Path:
        """Write the state after training ``round_id`` (atomically); then drop the files
        no resume can need (see the module docstring). ``keep_from``: default ``round_id``."""
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(round_id)
        payload = {"format": FORMAT, "name": self.name, "algorithm": algorithm, "round": int(round_id),
                   "state": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}}
        files.save(path, payload)
        keep_from = round_id if keep_from is None else min(int(keep_from), round_id)
        rounds = self.rounds()
        older = [r for r in rounds if r < keep_from]
        for r in older[:-1]:
            self.path(r).unlink(missing_ok=True)
        return path

