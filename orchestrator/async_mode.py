"""Buffered asynchronous aggregation (FedBuff: Nguyen et al., "Federated Learning
with Buffered Asynchronous Aggregation", AISTATS 2022).

``[federation] mode = "async"``. There are no rounds to be selected for: any
alive node that is idle (no upload in flight, no update waiting in the buffer)
gets the latest global model at once from ``GetTask``, tagged with its
``model_version``; it trains and pushes its delta with that base version. An
upload whose staleness ``s = current version - base version`` exceeds
``max_staleness`` is refused with ``FAILED_PRECONDITION`` and the message
``stale: based on version v, current V, max staleness S`` (checked at the header
and again when the stream completes). Each node has at most one update in the
buffer; after ``buffer_size`` (``B``) accepted arrivals the orchestrator
aggregates the buffer with the configured defense — the same rule, server step,
evaluation and metrics as a synchronous round — and bumps the model version.
One aggregation is one "round" of the run and one ``metrics.jsonl`` row
(``mode = "async"``), so ``rounds`` counts aggregations.

Staleness weighting: row ``i`` is multiplied by ``w_i`` before the defense sees
it, with ``w_i = 1`` (``constant``) or ``w_i = (1 + s_i)^-a`` (``polynomial``,
FedBuff's choice, ``a = staleness_exponent``), ``s_i`` the staleness when the
buffer is aggregated (an accepted update that waited in the buffer through
another aggregation can be one or more versions past ``max_staleness`` there). With the mean this is exactly FedBuff's
``(1/B) sum_i w(s_i) Δ_i``; a robust rule sees the down-weighted rows (a stale
update counts less in its geometry, and sample counts are left as they were).
The server step then applies ``server_lr`` (FedBuff's ``η_g``).

A step waits at most ``round_timeout`` for ``B`` arrivals; then it aggregates
what arrived if that meets the quorum (of ``B``), otherwise it is abandoned
with the reason, like a synchronous round. A node lost while it held a task
(lease expired or left) counts as dropped in the phase it was in: ``download``
(task not confirmed), ``train`` (no upload started), ``upload`` (stream broken).

Each ticket a node is served carries a random nonce bound to the ticket's
model version; the upload must echo it (the node's latest ticket only) and it is
used up when the update is accepted, so a captured upload re-sent later (with
its version rewritten, under the same session token) is refused
(``permission_denied``).

Kill and resume: the coordinator checkpoints after every aggregation (``output.
checkpoint_every``): the model, its version, the step, the buffer policy (part of the
run's identity: a resume with another ``buffer_size``, ``max_staleness`` or weighting is
refused) and :meth:`AsyncKeeper.bookkeeping` (each node's buffered update and open upload
with its base version, each task holder's phase). A resumed run starts from that version
with an empty buffer: the updates buffered or in flight at the kill are lost (the resumed
run writes which, as far as the checkpoint knew them, to ``RUN_DIR/resumed.jsonl``) and
every node is served a new task of the checkpoint's version. The buffer is taken in
node-id order, so with ``buffer_size`` = the number of nodes and ``max_staleness = 0``
(every step one update of every node, all of the current version) a run does not depend
on arrival times, and a killed and resumed run ends on the uninterrupted run's model.

The keeper has the round ledger's interface, so the gRPC servicer and the
ingest path serve both modes unchanged; like the ledger it is bookkeeping only
(the rows live in the row store's pool) and imports neither gRPC nor
``torch.distributed``. The loop that drives it is ``drivers.AsyncRounds``.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import failpoints
from .errors import Refusal
from .rounds import Upload, check_nonce, quorum_count


@dataclass
class Ticket:
    """What a task or an upload is tied to in async mode (the sync mode's ``Round``)."""

    round_id: int  # the aggregation step at the time
    model_version: int  # the task's version; for an upload, its base version
    num_selected: int  # B: the number of updates aggregated together (attacks' n)
    deadline: float
    payload: bytes = b""  # the weights of ``model_version`` (tasks only)
    nonce: str = ""  # tasks only: the upload answering this ticket echoes it

    def nonce_of(self, node_id: str) -> str:
        return self.nonce


@dataclass
class Buffered:
    upload: Upload
    base_version: int
    staleness: int = 0


def staleness_weights(staleness: list[int], scheme: str, exponent: float) -> torch.Tensor:
    """``w_i = 1`` (constant) or ``(1 + s_i)^-a`` (polynomial, FedBuff)."""
    s = torch.tensor(staleness, dtype=torch.float32)
    if scheme == "constant":
        return torch.ones_like(s)
    if scheme == "polynomial":
        return (1.0 + s).pow(-exponent)
    raise ValueError(f"unknown staleness_weighting {scheme!r}; allowed: 'constant', 'polynomial'")


class AsyncKeeper:
    """Thread-safe buffer of staleness-tagged updates (see the module docstring)."""

    def __init__(self, buffer_size: int, max_staleness: int, task_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.task_seconds = task_seconds
        self._clock = clock
        self._cond = threading.Condition()
        self.version = 0
        self.step = 0
        self._payload = b""
        self.buffer: list[Buffered] = []
        self.in_flight: dict[str, int] = {}  # node -> base version of its open upload stream
        self.holding: dict[str, str] = {}  # node -> phase, for nodes that hold a task and have not returned it
        self.nonces: dict[str, tuple[str, int]] = {}  # node -> (nonce, model version) of its latest ticket
        self.refused: dict[str, int] = {}
        self.tasks_served = 0
        self.current = None  # no open "round" (the adversary view and live progress look here)
        self.closed = False
        self.last_closed_id = -1

    # ----- the model the nodes pull ------------------------------------------------------
    def publish(self, step: int, version: int, payload: bytes) -> None:
        """Serve ``payload`` (the weights of ``version``) from now on."""
        with self._cond:
            self.step, self.version, self._payload = step, version, payload
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # ----- tasks ----------------------------------------------------------------------------
    def _idle(self, node_id: str) -> bool:
        return node_id not in self.in_flight and all(b.upload.node_id != node_id for b in self.buffer)

    def task_for(self, node_id: str) -> Optional[Ticket]:
        """The latest model if ``node_id`` is idle (no upload in flight, nothing in the buffer)."""
        with self._cond:
            if self.closed or not self._payload or not self._idle(node_id):
                return None
            return Ticket(self.step, self.version, self.buffer_size, self._clock() + self.task_seconds, self._payload)

    def wait_task(self, node_id: str, timeout: float) -> Optional[Ticket]:
        end = self._clock() + timeout
        with self._cond:
            while True:
                t = self.task_for(node_id)
                left = end - self._clock()
                if t is not None:
                    self.tasks_served += 1
                    self.holding[node_id] = "download"
                    t.nonce = secrets.token_hex(16)
                    self.nonces[node_id] = (t.nonce, t.model_version)  # the node's latest ticket only
                    return t
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def mark_downloaded(self, node_id: str, round_id: int) -> None:
        with self._cond:
            if self.holding.get(node_id) == "download":
                self.holding[node_id] = "train"

    # ----- uploads -----------------------------------------------------------------------------
    def _stale(self, base: int) -> Optional[Refusal]:
        if base > self.version or base < 0:
            return Refusal("stale", f"update is based on model version {base}, which does not exist "
                                    f"(current {self.version})")
        if self.version - base > self.max_staleness:
            return Refusal("stale", f"stale: based on version {base}, current {self.version}, "
                                    f"max staleness {self.max_staleness}")
        return None

    def count_refusal(self, reason: str) -> None:
        with self._cond:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def begin_upload(self, node_id: str, round_id: int, model_version: int, nonce: Optional[str] = None) -> Ticket:
        """Check an upload's header (staleness, one update per node in the buffer); reserve it.
        ``round_id`` is informational in async mode: the base version decides. ``nonce``: the
        header's ``upload_nonce``, which must be that of the node's latest ticket, for this
        version (``None`` skips the check: in-process callers that hold no ticket)."""
        with self._cond:
            if self.closed:
                raise Refusal("stale", "the run is over: no more updates are aggregated")
            refusal = self._stale(model_version)
            if refusal is not None:
                self.holding.pop(node_id, None)
                raise refusal
            if not self._idle(node_id):
                raise Refusal("duplicate", f"node {node_id} already has an update in flight or in the buffer "
                                           f"of step {self.step}")
            if nonce is not None:
                issued, version = self.nonces.get(node_id, ("", -1))
                task = f"the latest task sent to node {node_id}"
                check_nonce(nonce, issued, task + " (none is outstanding: its nonce was used or never issued)"
                            if not issued else task)
                if version != model_version:
                    raise Refusal("permission_denied", f"upload_nonce belongs to {task}, which trains model version "
                                                       f"{version}, not {model_version}: a replayed or forged upload")
            self.in_flight[node_id] = model_version
            self.holding[node_id] = "upload"
            return Ticket(self.step, model_version, self.buffer_size, self._clock() + self.task_seconds)

    def abort_upload(self, ticket: Ticket, node_id: str, reason: str) -> None:
        with self._cond:
            self.in_flight.pop(node_id, None)
            self.refused[reason] = self.refused.get(reason, 0) + 1
            self._cond.notify_all()

    def finish_upload(self, ticket: Ticket, upload: Upload) -> None:
        with self._cond:
            self.in_flight.pop(upload.node_id, None)
            self.holding.pop(upload.node_id, None)
            refusal = Refusal("stale", "the run is over: no more updates are aggregated") if self.closed \
                else self._stale(ticket.model_version)
            if refusal is not None:
                raise refusal  # the servicer counts it
            issued = self.nonces.get(upload.node_id)
            if issued is not None and issued[1] == ticket.model_version:
                del self.nonces[upload.node_id]  # used up: the same upload re-sent later is refused
            self.buffer.append(Buffered(upload, ticket.model_version))
            self._cond.notify_all()
        failpoints.reached("collect", self.step)

    # ----- the aggregation loop ---------------------------------------------------------------
    def wait_buffer(self, timeout: float, quorum: float, stop: threading.Event,
                    is_alive: Callable[[str], bool]) -> tuple[list[Buffered], str, dict[str, Any]]:
        """Wait for ``B`` buffered updates (at most ``timeout``); take them with their staleness.

        Returns ``(entries, outcome, facts)``: outcome ``complete``, ``deadline`` (quorum of
        ``B`` met) or ``abandoned: ...`` (nothing taken); ``facts``: refusals, tasks served and
        nodes dropped (by phase) since the previous step."""
        need = quorum_count(quorum, self.buffer_size)
        with self._cond:
            end = self._clock() + timeout
            while len(self.buffer) < self.buffer_size and self._clock() < end and not stop.is_set():
                self._cond.wait(min(0.25, max(0.0, end - self._clock())))
            n = len(self.buffer)
            if n >= self.buffer_size:
                outcome = "complete"
            elif n >= need and not stop.is_set():
                outcome = "deadline"
            else:
                outcome = f"abandoned: {n} of {self.buffer_size} buffered, quorum {need} " \
                          f"({'stopped' if stop.is_set() else 'deadline'})"
            taken: list[Buffered] = []
            if not outcome.startswith("abandoned"):
                taken, self.buffer = self.buffer[:self.buffer_size], self.buffer[self.buffer_size:]
                taken.sort(key=lambda b: b.upload.node_id)  # canonical order (as a sync round's): sums do not
                for b in taken:                              # depend on the arrival order within the buffer
                    b.staleness = self.version - b.base_version
            dropped = {"download": 0, "train": 0, "upload": 0}
            for node_id, phase in list(self.holding.items()):
                if not is_alive(node_id) and node_id not in self.in_flight:
                    dropped[phase] += 1
                    del self.holding[node_id]
            facts = {"refused": dict(self.refused), "tasks_served": self.tasks_served, "dropped": dropped,
                     "buffered_after": len(self.buffer)}
            self.refused, self.tasks_served = {}, 0
            return taken, outcome, facts

    def bookkeeping(self, name_of: Callable[[str], str]) -> dict[str, Any]:
        """What a checkpoint keeps of the buffer's state (by node name: node ids are per run):
        the step and version served, each node's buffered update and open upload (their base
        versions: their staleness) and each task holder's phase. A resumed run starts with an
        empty buffer: these updates are lost with the process and the tasks are issued anew."""
        with self._cond:
            return {"step": self.step, "version": self.version,
                    "buffered": {name_of(b.upload.node_id): b.base_version for b in self.buffer},
                    "in_flight": {name_of(n): v for n, v in self.in_flight.items()},
                    "holding": {name_of(n): phase for n, phase in self.holding.items()}}

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def drain_late(self) -> int:
        return 0  # async uploads have no round to be late for; stale ones are in ``refused``
