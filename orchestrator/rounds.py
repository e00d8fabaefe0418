"""The round ledger: open, collect, close. Pure bookkeeping: no tensors, no gRPC,
no torch.distributed (the rows themselves live in ``rowstore.RowStore``).

A round opens with its selected nodes, a deadline and a quorum. Uploads are
checked against it (selected, right round and model version, one per node) and
recorded whole or not at all. It closes when every selected node reported (or,
with over-selection, when ``target`` of them did), or at the deadline — early if
every node still missing is dead or broke off its upload (a broken stream is
discarded and ends the node's part in the round: one attempt per round). With
the quorum met it is aggregated, otherwise abandoned with the reason recorded.

Where a missing node was lost is inferred from what the orchestrator saw
(:meth:`Round.dropped_phases`): it never confirmed the whole task
(``download``), it confirmed the task but started no upload (``train``), or its
upload started and never completed (``upload``: a broken stream, discarded).

Each selected node gets a random nonce for the round (:attr:`Round.nonces`,
sent in its task); an upload header must echo it, so an upload captured in
one round and re-sent in another with its round and model version rewritten
(under the same session token) is refused (``permission_denied``).
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import failpoints
from .errors import Refusal


@dataclass
class Upload:
    """What the ledger records of an accepted upload (its row is in the row store)."""

    node_id: str
    num_samples: int
    num_bytes: int
    seconds: float


@dataclass
class Round:
    round_id: int
    model_version: int
    selected: frozenset[str]
    quorum: int
    opened_at: float
    deadline: float
    uploads: dict[str, Upload] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    refused: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    outcome: str = ""
    closed_at: float = 0.0
    target: int = 0
    """Close as soon as this many reported (over-selection); 0: all selected."""
    downloaded: set[str] = field(default_factory=set)
    """Nodes that confirmed they received the whole task."""
    upload_started: set[str] = field(default_factory=set)
    """Nodes whose upload header was accepted (the stream may have broken since)."""
    broken: set[str] = field(default_factory=set)
    """Nodes whose upload stream broke (the client died or cut it): one attempt per round,
    so a node restarted after a crash waits for the next round instead of retrying this one."""
    nonces: dict[str, str] = field(default_factory=dict)
    """node -> the random nonce of its task this round; its upload header must echo it."""

    size: int = 0
    """The round's selection over every aggregation rank (0: ``len(selected)``; an ingest
    rank's ledger holds only the nodes it serves)."""
    attempt: int = 0
    """0, or how many times this round was run before (``aggregation.rerun_rounds``: a rank
    died and the group re-formed); nodes train a round once per attempt."""

    def nonce_of(self, node_id: str) -> str:
        """The upload nonce to send with ``node_id``'s task of this round."""
        return self.nonces.get(node_id, "")

    @property
    def num_selected(self) -> int:
        return self.size or len(self.selected)

    @property
    def missing(self) -> set[str]:
        return set(self.selected) - set(self.uploads)

    def dropped_phases(self) -> dict[str, str]:
        """``{node_id: phase}`` of the missing nodes: where each was lost (see the module docstring)."""
        return {n: "upload" if n in self.upload_started else "train" if n in self.downloaded else "download"
                for n in self.missing}


def check_nonce(sent: str, issued: str, task: str) -> None:
    """Refuse an upload whose nonce is missing or is not ``issued`` (a replayed or forged upload)."""
    if not sent:
        raise Refusal("permission_denied", f"the upload carries no upload_nonce; echo the upload_nonce of {task}")
    if not issued or not hmac.compare_digest(sent.encode(), issued.encode()):
        raise Refusal("permission_denied", f"upload_nonce does not match {task}: a replayed or forged upload "
                                           "(an upload answers the one task it was trained for)")


def quorum_count(quorum: float, selected: int) -> int:
    """A fraction in (0, 1] of the selected nodes (rounded up), or a count when > 1."""
    need = int(quorum) if quorum > 1 else -(-int(round(quorum * selected * 1e6)) // 1_000_000)
    return max(1, min(selected, need))


class RoundKeeper:
    """Thread-safe holder of the one open round."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 nonce_fn: Optional[Callable[[int, int, str], str]] = None) -> None:
        """``nonce_fn(round, version, node_id)``: the upload nonce of a task (derived from the
        run's key, ``identity.SessionKeys.nonce``, so every ingest rank knows it); default random."""
        self._clock = clock
        self._nonce = nonce_fn or (lambda r, v, n: secrets.token_hex(16))
        self._cond = threading.Condition()
        self.current: Optional[Round] = None
        self.last_closed_id = -1
        self.late_refused = 0  # uploads that came after their round closed, since the last drain_late()

    def open(self, round_id: int, model_version: int, selected: set[str], timeout: float, quorum: float,
             target: int = 0) -> Round:
        with self._cond:
            now = self._clock()
            self.current = Round(round_id, model_version, frozenset(selected), quorum_count(quorum, len(selected)),
                                 now, now + timeout, target=target if 0 < target < len(selected) else 0,
                                 nonces={n: self._nonce(round_id, model_version, n) for n in selected})
            self._cond.notify_all()
            return self.current

    def task_for(self, node_id: str) -> Optional[Round]:
        """The open round if ``node_id`` is selected and has not uploaded (or broken an upload) yet."""
        with self._cond:
            r = self.current
            if (r and not r.closed and node_id in r.selected and node_id not in r.uploads and node_id not in r.in_flight
                    and node_id not in r.broken):
                return r
            return None

    def wait_task(self, node_id: str, timeout: float) -> Optional[Round]:
        end = self._clock() + timeout
        with self._cond:
            while True:
                r = self.task_for(node_id)
                left = end - self._clock()
                if r is not None or left <= 0:
                    return r
                self._cond.wait(min(left, 0.5))

    def mark_downloaded(self, node_id: str, round_id: int) -> None:
        """The node confirmed it received the whole task of ``round_id``."""
        with self._cond:
            r = self.current
            if r is not None and r.round_id == round_id and node_id in r.selected:
                r.downloaded.add(node_id)

    def count_refusal(self, reason: str) -> None:
        """Record a refused upload against the open round (for the round's metrics)."""
        with self._cond:
            r = self.current
            if r is not None:
                r.refused[reason] = r.refused.get(reason, 0) + 1

    def begin_upload(self, node_id: str, round_id: int, model_version: int, nonce: Optional[str] = None) -> Round:
        """Check an upload's header against the open round and reserve its slot.

        ``nonce``: the header's ``upload_nonce``; it must be the one sent with the node's
        task of this round. The gRPC edge always passes it (``""`` when the header has
        none); ``None`` skips the check (in-process callers that hold no task)."""
        with self._cond:
            r = self.current
            if r is None or round_id != r.round_id or r.closed:
                state = "no round is open" if r is None else (
                    f"round {r.round_id} is {'closed' if r.closed else 'open'}")
                if r is not None and (round_id < r.round_id or r.closed):
                    self.late_refused += 1
                raise Refusal("stale", f"stale upload for round {round_id}: {state}")
            if node_id not in r.selected:
                raise Refusal("permission_denied", f"node {node_id} was not selected for round {round_id}")
            if model_version != r.model_version:
                raise Refusal("stale", f"update is based on model version {model_version}; round {round_id} "
                                               f"trains version {r.model_version}")
            if node_id in r.uploads or node_id in r.in_flight:
                raise Refusal("duplicate", f"node {node_id} already sent an update for round {round_id}")
            if node_id in r.broken:
                raise Refusal("duplicate", f"node {node_id}'s upload for round {round_id} broke off; "
                                                   "one attempt per round")
            if nonce is not None:
                check_nonce(nonce, r.nonce_of(node_id), f"the task of round {round_id} sent to node {node_id}")
            r.in_flight.add(node_id)
            r.upload_started.add(node_id)
            return r

    def abort_upload(self, r: Round, node_id: str, reason: str) -> None:
        """Drop a half-received upload: nothing of it is kept. A broken stream (reason
        ``broken_stream``) also ends the node's part in the round."""
        with self._cond:
            r.in_flight.discard(node_id)
            if reason == "broken_stream":
                r.broken.add(node_id)
            r.refused[reason] = r.refused.get(reason, 0) + 1
            self._cond.notify_all()

    def finish_upload(self, r: Round, upload: Upload) -> None:
        with self._cond:
            r.in_flight.discard(upload.node_id)
            if r.closed or self.current is not r:
                self.late_refused += 1
                raise Refusal("stale", f"round {r.round_id} closed ({r.outcome}) before the upload finished")
            r.uploads[upload.node_id] = upload
            self._cond.notify_all()
        failpoints.reached("collect", r.round_id)

    def wait_close(self, is_alive: Callable[[str], bool], poll: float = 0.2) -> Round:
        """Block until the open round can close; close it and return it."""
        with self._cond:
            r = self.current
            assert r is not None and not r.closed
            while True:
                now = self._clock()
                if r.closed:  # closed from outside (``close_now``: the aggregation group failed)
                    return r
                missing = r.missing
                if not missing:
                    outcome = "complete"
                    break
                if r.target and len(r.uploads) >= r.target:
                    outcome = "target"
                    break
                if now >= r.deadline:
                    outcome = "deadline"
                    break
                if not r.in_flight and not any(is_alive(n) and n not in r.broken for n in missing):
                    outcome = "dead-nodes"
                    break
                self._cond.wait(min(poll, max(0.0, r.deadline - now)))
            if len(r.uploads) < r.quorum:
                outcome = f"abandoned: {len(r.uploads)} of {len(r.selected)} reported, quorum {r.quorum} ({outcome})"
            r.closed, r.outcome, r.closed_at = True, outcome, now
            self.last_closed_id = r.round_id
            self._cond.notify_all()
            return r

    def mirror(self, round_id: int, node_id: str, state: str, upload: Optional[Upload] = None,
               after_close: bool = False) -> None:
        """Record what another ingest rank saw of ``node_id``'s upload this round (the
        leader's ledger, from the group's polls): ``in_flight``, ``done`` (with its
        ``upload``) or ``broken``. Idempotent; ignored once the round is closed, except
        (``after_close``) the uploads the sealing poll reports done: the other rank told
        their nodes they were stored before it learnt of the close, so they count."""
        with self._cond:
            r = self.current
            if r is None or r.round_id != round_id or node_id not in r.selected:
                return
            if r.closed and not (after_close and state == "done"):
                return
            if state == "in_flight":
                r.in_flight.add(node_id)
                r.upload_started.add(node_id)
            elif state == "done" and upload is not None:
                r.in_flight.discard(node_id)
                r.upload_started.add(node_id)
                r.uploads[node_id] = upload
            elif state == "broken":
                r.in_flight.discard(node_id)
                r.upload_started.add(node_id)
                r.broken.add(node_id)
            self._cond.notify_all()

    def close_now(self, outcome: str) -> Optional[Round]:
        """Close the open round at once (an ingest rank told by its leader); later uploads
        of it are refused as late."""
        with self._cond:
            r = self.current
            if r is None or r.closed:
                return r
            r.closed, r.outcome, r.closed_at = True, outcome, self._clock()
            self.last_closed_id = r.round_id
            self._cond.notify_all()
            return r

    def drain_late(self) -> int:
        with self._cond:
            n, self.late_refused = self.late_refused, 0
            return n

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
