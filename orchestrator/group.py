"""The aggregation group at run time: W orchestrator ranks, one leader.

Rank 0 leads: membership, selection, the round ledger, the model, evaluation,
metrics and checkpoints. Every rank is an ingest endpoint: a node is assigned
to a rank at its join (the least loaded; a re-join keeps its rank) and
downloads its tasks from and uploads its updates to that rank, whose session
checks need no round trip (``identity.SessionKeys``: ids, tokens and upload
nonces derive from the run's key, which the leader broadcasts, sealed, when the
group forms).

Security (``ranksec``): every rank holds the run's group secret (from the
launcher: environment or a 0600 file, never the network). At each generation
of the group (its forming, every re-form) the leader posts a fresh challenge on
its store, each rank answers a proof of the secret, the leader admits those
whose proof verifies (logging the others) and the generation's process group
meets under a prefix derived from the secret (:meth:`Roster.authenticate`). The
run's key crosses sealed; with ``security.tls``/``mtls`` or
``security.rank_encryption`` every collective's payload does
(``collective.AggregationGroup``), and a payload that does not open fails the
collective like a dead rank.

Everything between ranks is a ``torch.distributed`` collective on tensors
(``collective.AggregationGroup``): never a pickled object. The leader drives;
the other ranks wait for its next command, a small int64 header broadcast
from rank 0, and run the collectives that follow it:

``OPEN``   the round's model (``[d]`` float32, so downloads spread) and its
           selection as ``[n, 2]`` (roster index, ingest rank); the header carries
           the leader's torch thread count, which every rank then uses (a rule run
           whole on every rank reduces in the same order everywhere);
``POLL``   every rank's upload states (``[m, 5]``: index, state, samples,
           bytes, microseconds) gathered to all, which the leader mirrors into
           its ledger (every 0.2 s while a round is open; the last poll also
           seals the round on every rank);
``CLOSE``  the manifest (``[k, 3]``: index, ingest rank, trusted sample count,
           in canonical order), then each rank's rows of it packed ``[cap, d]``
           and all-gathered (``gather_rows``) into the whole ``[k, d]`` matrix on
           every rank, then the defense on every rank with its work split
           (``shards``), identical on all; the leader alone applies the server
           step, evaluates and records;
``NOOP``   a tick when the leader is idle (waiting for joins, evaluating), so
           a rank can tell a dead leader from a quiet one within the
           collectives' timeout (``aggregation.timeout_seconds``);
``STOP``   the run is over.

A rank that dies makes the next collective fail within that timeout (gloo
usually at once, on the broken connection). On gloo the group is then
re-formed without it (:class:`Roster`): the leader drops its broken process
group (which usually breaks every other rank's pending collective too), the
survivors answer a roll call on the group's long-lived store
(``collective.open_store``, hosted by rank 0), and the leader publishes the
new member list. The leader waits for every rank whose liveness beat on that
store still moves (a survivor stuck in a collective answers when its timeout
fires) and gives up on a rank whose beat stood still for ``STALE_SECONDS``; every survivor joins the next generation of the process
group under its new rank. The round in progress is abandoned (recorded with
the reason), the dead rank's nodes are made to re-join and get another rank's
ingest address, and the run goes on. On NCCL, or with a dead leader, the run
stops with a :class:`GroupError` naming what failed; the last checkpoint
resumes it (``--run-dir``).
"""
from __future__ import annotations

import datetime
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .collective import AggregationGroup, open_store, pick_device
from .errors import Refusal
from .identity import KEY_BYTES, SessionKeys, TokenRefused, index_of
from .ranksec import (GROUP_KEY_ENV, GroupAuthError, GroupKeyError, GroupSecret, group_key_from, new_group_key)
from .rounds import Round, Upload

log = logging.getLogger("orchestrator.group")

NOOP, OPEN, POLL, CLOSE, STOP = range(5)
HEADER = 7
ADDRESS_BYTES = 256
IN_FLIGHT, DONE, BROKEN = 1, 2, 3
STATE_NAMES = {IN_FLIGHT: "in_flight", DONE: "done", BROKEN: "broken"}
POLL_SECONDS = 0.2
TICK_SECONDS = 2.0
BEAT_SECONDS = 0.5
"""How often a non-leader rank counts up its liveness beat on the group's store."""
STALE_SECONDS = 5.0
"""A rank whose beat has not moved for this long is dead: the roll call stops waiting for it."""


class GroupError(RuntimeError):
    """A collective of the aggregation group failed (a rank died or stopped answering)."""


@dataclass(frozen=True)
class GroupSpec:
    """Where this process stands in the aggregation group."""

    rank: int
    world: int
    rendezvous: str
    """``tcp://host:port`` that rank 0 hosts (the torch.distributed store)."""
    advertise_host: str = ""
    """The host other machines reach this rank's ingest endpoint at ('' on one machine)."""
    mpi_comm: Any = field(default=None, compare=False)
    """Under ``mpirun``: an MPI communicator of the aggregation ranks (same order), for
    the MPI gather path (``aggregation.gather``)."""
    group_key: bytes = field(default=b"", repr=False, compare=False)
    """The run's group secret (``ranksec``; never logged). b'': from the environment
    (:data:`~orchestrator.ranksec.GROUP_KEY_ENV` or ``..._FILE``)."""


def rank_encryption(scenario) -> bool:
    """Whether the ranks' collectives are sealed: with TLS on (``security.tls``/``mtls``)
    or ``security.rank_encryption``. Join proofs and the sealed run key are always on."""
    sec = scenario.security
    return bool(sec.enabled or getattr(sec, "rank_encryption", False))


def group_secret(spec: GroupSpec) -> GroupSecret:
    """The group secret of ``spec`` (or the environment); :class:`GroupError` naming
    where it was looked for when there is none."""
    try:
        key = spec.group_key or group_key_from()
    except GroupKeyError as e:
        raise GroupError(str(e)) from None
    if not key:
        raise GroupError(f"rank {spec.rank}: no group key: the launcher hands every rank of a run the same one, "
                         f"in ${GROUP_KEY_ENV} (64 hex digits) or a 0600 file (--group-key-file, "
                         f"$BYZFED_GROUP_KEY_FILE)")
    return GroupSecret(key)


def pick_gather(group: AggregationGroup, scenario, comm: Any, d: int, device: torch.device) -> str:
    """Route the group's row gathers through MPI where ``aggregation.gather`` asks for it
    (``auto``: where it measured faster here, the same choice on every rank). A
    collective call on every rank of the group; returns the path chosen."""
    want = scenario.aggregation.gather
    if group.group is None or want == "gloo" or device.type != "cpu":
        return "nccl" if device.type == "cuda" else "gloo"
    if comm is None:
        if want == "mpi":
            raise GroupError("aggregation.gather = 'mpi' needs an mpirun job (python -m orchestrator mpi); "
                             "allowed here: 'gloo', 'auto'")
        return "gloo"
    from .mpigather import MpiGather, choose_gather

    mpi = MpiGather(comm, sealer=group.sealer if group.sealing else None)
    if want == "auto":
        per_rank = -(-scenario.num_nodes // group.world_size)
        sample = torch.zeros(max(1, min(per_rank, (64 << 20) // max(1, 4 * d))), d)  # at most 64 MiB
        gloo = _Through(group.gloo_gather_rows)
        if choose_gather({"gloo": gloo, "mpi": mpi}, sample) != "mpi":
            return "gloo"
    group.mpi = mpi
    return "mpi"


@dataclass
class _Through:
    gather_rows: Any


def encode_text(text: str, size: int = ADDRESS_BYTES) -> torch.Tensor:
    raw = text.encode()
    if len(raw) > size:
        raise ValueError(f"{text!r} is over {size} bytes")
    t = torch.zeros(size, dtype=torch.uint8)
    if raw:
        t[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return t


def decode_text(t: torch.Tensor) -> str:
    raw = bytes(t.tolist())
    return raw.rstrip(b"\0").decode()


class Roster:
    """The group's members across generations: each rank's original id (its rank when
    the run started) in today's rank order, on the run's long-lived store."""

    def __init__(self, store, rid: int, world: int, device: torch.device, timeout_s: float,
                 secret: Optional[GroupSecret] = None, encrypt: bool = False) -> None:
        self.store, self.rid, self.device, self.timeout_s = store, rid, device, timeout_s
        self.secret, self.encrypt = secret, encrypt
        self.members = list(range(world))
        self.generation = 0
        self.challenge = b""
        """The leader's challenge of the current generation (its keys derive from it)."""
        self.refused: list[dict[str, Any]] = []
        """Join proofs the leader refused (generation, rank, why); see :meth:`admit`."""
        self._stopped = threading.Event()
        self._beater: Optional[threading.Thread] = None
        if rid != 0 and world > 1:
            self._beater = threading.Thread(target=self._beat, name=f"rank-{rid}-beat", daemon=True)
            self._beater.start()

    def _beat(self) -> None:
        """Count this rank's beat up on the store (its own connection, so a blocking store
        call of the rank's main thread never holds it): the leader's roll call tells a rank
        that is slow to notice a failure (still in a collective) from a dead one by it."""
        try:
            beat = dist.TCPStore(self.store.host, self.store.port, None, False,
                                 datetime.timedelta(seconds=self.timeout_s))
            while not self._stopped.is_set():
                beat.add(f"beat/{self.rid}", 1)
                self._stopped.wait(BEAT_SECONDS)
        except (RuntimeError, OSError):  # (the store is rank 0's: the leader is gone)
            return

    def stop(self) -> None:
        """Stop the liveness beat and wait (a few seconds at most) for its thread: a store
        call still in flight when the process exits aborts it (SIGABRT) instead of a clean exit."""
        self._stopped.set()
        t = self._beater
        if t is not None and t is not threading.current_thread():
            t.join(timeout=BEAT_SECONDS + 5.0)

    @property
    def rank(self) -> int:
        return self.members.index(self.rid)

    def _roll_call(self, g: int) -> list[int]:
        now = time.monotonic()
        end = now + self.timeout_s + STALE_SECONDS
        pending = [m for m in self.members if m != 0]
        seen = {m: (self.store.add(f"beat/{m}", 0), now) for m in pending}
        alive = [0]
        while pending and time.monotonic() < end:
            now = time.monotonic()
            for m in list(pending):
                if self.store.check([f"roll{g}/{m}"]):
                    alive.append(m)
                    pending.remove(m)
                    continue
                beats = self.store.add(f"beat/{m}", 0)
                if beats != seen[m][0]:
                    seen[m] = (beats, now)
                elif now - seen[m][1] > STALE_SECONDS:
                    pending.remove(m)  # dead: its beat stood still
            time.sleep(0.05)
        return sorted(alive)

    # ----- join proofs (ranksec) -------------------------------------------------------
    def _wait_get(self, key: str, seconds: float) -> bytes:
        self.store.wait([key], datetime.timedelta(seconds=seconds))
        return self.store.get(key)

    def challenge_for(self, g: int) -> None:
        """The leader: post generation ``g``'s fresh challenge (MACed)."""
        self.challenge = os.urandom(32)
        self.store.set(f"auth{g}/challenge", self.challenge + self.secret.challenge_tag(g, self.challenge))

    def admit(self, g: int, candidates: list[int], seconds: float) -> list[int]:
        """The leader: wait (at most ``seconds``) for a valid join proof from each of
        ``candidates`` (original ids, 0 aside), refusing and logging every proof that does
        not verify; post the MACed admission of those that proved (with this rank) and
        return them."""
        chal = self.challenge
        pending: dict[int, set[int]] = {m: set() for m in candidates if m != 0}  # id -> proof slots read
        admitted: dict[int, bytes] = {}
        end = time.monotonic() + seconds
        while pending and time.monotonic() < end:
            for m in list(pending):
                n = min(self.store.add(f"auth{g}/{m}/n", 0), 64)  # (a flood of claims is not read past 64)
                for k in range(1, n + 1):
                    slot = f"auth{g}/{m}/{k}"
                    if k in pending[m] or not self.store.check([slot]):
                        continue  # (read already, or claimed and not written yet)
                    pending[m].add(k)
                    raw = self.store.get(slot)
                    nonce, tag = raw[:16], raw[16:]
                    if len(raw) == 48 and self.secret.check_proof(g, m, chal, nonce, tag):
                        admitted[m] = nonce
                        del pending[m]
                        break
                    why = "its proof of the group secret does not verify (a process without the run's group key)"
                    self.refused.append({"generation": g, "rank": m, "why": why})
                    log.error("refused a join as aggregation rank %d (generation %d): %s", m, g, why)
            if pending:
                time.sleep(0.02)
        members = sorted([0, *admitted])
        body = ",".join(f"{m}:{admitted[m].hex() if m else ''}" for m in members) + f";enc={int(self.encrypt)}"
        self.store.set(f"auth{g}/admit", body.encode() + self.secret.admission_tag(g, chal, body.encode()))
        if pending:
            log.error("aggregation rank(s) %s did not prove the group secret within %.0f s (generation %d): left out",
                      sorted(pending), seconds, g)
        return members

    def prove(self, g: int, seconds: float) -> list[int]:
        """A non-leader rank: answer generation ``g``'s challenge and wait for the
        leader's admission; the admitted members. :class:`GroupAuthError` when this rank
        and the leader do not hold the same group secret, or this rank was not admitted."""
        raw = self._wait_get(f"auth{g}/challenge", seconds)
        chal, ctag = raw[:32], raw[32:]
        nonce = os.urandom(16)
        k = self.store.add(f"auth{g}/{self.rid}/n", 1)
        self.store.set(f"auth{g}/{self.rid}/{k}", nonce + self.secret.proof(g, self.rid, chal, nonce))
        if not hmac_ok(self.secret.challenge_tag(g, chal), ctag):
            raise GroupAuthError(f"rank {self.rid}: the leader's challenge (generation {g}) does not verify under "
                                 "this rank's group key: it was started with another key than the leader's "
                                 f"(${GROUP_KEY_ENV} / --group-key-file); the leader refuses it")
        raw = self._wait_get(f"auth{g}/admit", seconds)
        body, tag = raw[:-32], raw[-32:]
        if not hmac_ok(self.secret.admission_tag(g, chal, body), tag):
            raise GroupAuthError(f"rank {self.rid}: the group's admission (generation {g}) does not verify under "
                                 "this rank's group key")
        listed, _, enc = body.decode().partition(";enc=")
        entries = dict(e.split(":") for e in listed.split(","))
        if entries.get(str(self.rid)) != nonce.hex():
            raise GroupAuthError(f"rank {self.rid}: the leader did not admit this process to generation {g} of the "
                                 "group (another process proved this rank first, or this one came too late)")
        if enc != str(int(self.encrypt)):
            raise GroupAuthError(f"rank {self.rid}: the leader {'seals' if enc == '1' else 'does not seal'} the "
                                 "group's collectives and this rank would not (security.tls / "
                                 "security.rank_encryption differ between the ranks' scenarios)")
        self.challenge = chal
        return sorted(int(m) for m in entries)

    def authenticate(self, g: int, candidates: list[int], seconds: float) -> list[int]:
        """Generation ``g``'s join proofs (leader: challenge and admission; others:
        proof): the members admitted. Without a secret (tests of the bare group): all."""
        if self.secret is None:
            return candidates
        if self.rid == 0:
            return self.admit(g, candidates, seconds)
        return self.prove(g, seconds)

    def form(self) -> AggregationGroup:
        g = self.generation
        if self.secret is None:
            return AggregationGroup.on_store(self.store, g, self.rank, len(self.members), self.device,
                                             self.timeout_s)
        return AggregationGroup.on_store(self.store, g, self.rank, len(self.members), self.device, self.timeout_s,
                                         prefix=self.secret.prefix(g, self.challenge),
                                         sealer=self.secret.sealer(g, self.challenge, self.rank),
                                         encrypt=self.encrypt)

    def reform(self, group: AggregationGroup) -> list[int]:
        """After a failed collective: drop the broken group, answer the roll call of the
        next generation and join it. Returns the original ids that left. Raises
        :class:`GroupError` if this rank is not in the new group or the leader is gone.

        The leader waits for every member that still beats (a survivor may be slow to see
        the failure, inside a collective until its timeout) and gives up on one whose beat
        stood still for ``STALE_SECONDS``; at most the collectives' timeout plus that in all."""
        g = self.generation + 1
        group.close()
        try:
            if self.rid == 0 and self.secret is not None:
                self.challenge_for(g)
            self.store.set(f"roll{g}/{self.rid}", b"1")
            if self.rid == 0:
                alive = self._roll_call(g)
                if self.secret is not None:  # each survivor proves the group secret again
                    alive = self.authenticate(g, alive, self.timeout_s)
                self.store.set(f"roll{g}/members", ",".join(map(str, alive)).encode())
            elif self.secret is not None:
                alive = self.prove(g, self.timeout_s + 2 * STALE_SECONDS + self.timeout_s)
            else:
                self.store.wait([f"roll{g}/members"], datetime.timedelta(seconds=self.timeout_s + 2 * STALE_SECONDS))
                alive = [int(x) for x in self.store.get(f"roll{g}/members").decode().split(",")]
        except GroupAuthError as e:
            raise GroupError(str(e)) from e
        except (RuntimeError, OSError) as e:  # (the store is rank 0's: the leader is gone)
            raise GroupError(f"the aggregation group could not re-form (the leader is gone?): {e}") from e
        gone = [m for m in self.members if m not in alive]
        if self.rid not in alive:
            raise GroupError(f"rank {self.rid} answered the roll call too late and is not in the re-formed group")
        self.members, self.generation = alive, g
        group.adopt(self.form())
        return gone


def _gloo_on(address: str) -> None:
    """Make gloo connect over the interface that holds ``address`` (the address this rank
    advertises to the other machines), unless ``GLOO_SOCKET_IFNAME`` says otherwise:
    gloo's default, the address this machine's name resolves to, may be a loopback
    address the other machines cannot reach."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    from .interfaces import interfaces
    for name, iface in interfaces():
        if str(iface.ip) == address:
            os.environ["GLOO_SOCKET_IFNAME"] = name
            log.info("gloo connects over %s (%s)", name, address)
            return


def form(spec: GroupSpec, device: torch.device, timeout_s: float,
         keys: Optional[SessionKeys] = None, encrypt: bool = False) -> tuple[AggregationGroup, SessionKeys, Roster]:
    """Join the group (generation 0 on the run's store): every rank proves the run's
    group secret to the leader (``Roster.authenticate``), then rank 0's session key
    (``keys``) is shared, sealed. ``encrypt``: seal every later collective too
    (:func:`rank_encryption`). :class:`GroupError` when this rank cannot join."""
    secret = group_secret(spec)
    if spec.advertise_host and device.type == "cpu":
        _gloo_on(spec.advertise_host)
    store = open_store(spec.rendezvous, spec.rank == 0, timeout_s)
    roster = Roster(store, spec.rank, spec.world, device, timeout_s, secret, encrypt)
    try:
        if spec.rank == 0:
            roster.challenge_for(0)
        members = roster.authenticate(0, list(range(spec.world)), timeout_s)
    except GroupAuthError as e:
        roster.stop()
        raise GroupError(str(e)) from e
    except (RuntimeError, OSError) as e:  # (a store wait timed out, or the leader's store is gone)
        roster.stop()
        raise GroupError(f"rank {spec.rank}: could not join the aggregation group at {spec.rendezvous}: {e}") from e
    if members != list(range(spec.world)):
        roster.stop()
        missing = sorted(set(range(spec.world)) - set(members))
        raise GroupError(f"aggregation rank(s) {missing} did not prove the run's group secret within {timeout_s:.0f} s "
                         f"(refused: {len(roster.refused)} proof(s)); start every rank with the run's group key "
                         f"(${GROUP_KEY_ENV} / --group-key-file)")
    group = roster.form()
    key = torch.zeros(KEY_BYTES, dtype=torch.uint8)
    if spec.rank == 0:
        keys = keys or SessionKeys()
        key[:] = torch.frombuffer(bytearray(keys.key), dtype=torch.uint8)
    group.broadcast_(key.to(device), sealed=True)  # (never in the clear: AES-GCM under the group secret)
    if spec.rank == 0:
        log.info("aggregation group of %d ranks formed: every rank proved the group secret; collectives %s",
                 spec.world, "sealed (AES-GCM)" if group.sealing else "not sealed (security.rank_encryption off)")
    return group, (keys if spec.rank == 0 else SessionKeys(bytes(key.cpu().tolist()))), roster


def hmac_ok(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def exchange_addresses(group: AggregationGroup, mine: str, device: torch.device) -> list[str]:
    """Every rank's advertised ingest address, by rank."""
    rows, _ = group.gather_rows(encode_text(mine)[None].to(device))
    return [decode_text(r) for r in rows.cpu()]


class Assignment:
    """Which ingest rank serves each node, by the rank's original id: the least loaded
    live rank at the node's first join (by nodes assigned; ties to the lowest id), kept on
    re-joins while that rank lives."""

    def __init__(self, world: int) -> None:
        self.live = list(range(world))
        self._rank: dict[str, int] = {}
        self._load = {r: 0 for r in self.live}
        self._lock = threading.Lock()

    def rank_of(self, node_id: str) -> int:
        with self._lock:
            r = self._rank.get(node_id)
            if r is None:
                r = min(self.live, key=lambda k: (self._load[k], k))
                self._rank[node_id] = r
                self._load[r] += 1
            return r

    def known(self, node_id: str) -> Optional[int]:
        with self._lock:
            return self._rank.get(node_id)

    def remove(self, gone: list[int]) -> list[str]:
        """Forget ranks that left; returns their nodes (unassigned: they get a live rank
        at their re-join)."""
        with self._lock:
            self.live = [r for r in self.live if r not in gone]
            nodes = [n for n, r in self._rank.items() if r in gone]
            for n in nodes:
                del self._rank[n]
            for r in gone:
                self._load.pop(r, None)
            return nodes


class Commands:
    """The leader's end of the command stream: one command (header + its collectives)
    at a time, under a lock; a ticker sends ``NOOP`` when nothing was sent for a while."""

    def __init__(self, group: AggregationGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.lock = threading.RLock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.failed: Optional[BaseException] = None
        self._ticker = threading.Thread(target=self._tick, name="group-ticker", daemon=True)
        self._ticker.start()

    def send(self, cmd: int, *fields: int) -> None:
        h = torch.zeros(HEADER, dtype=torch.int64)
        h[0] = cmd
        for i, v in enumerate(fields):
            h[1 + i] = int(v)
        self.call(self.group.broadcast_, h.to(self.device))

    def call(self, fn, *args):
        """Run one collective; any failure becomes a :class:`GroupError` (and is remembered)."""
        if self.failed is not None:
            raise GroupError(f"the aggregation group failed earlier: {self.failed}")
        try:
            out = fn(*args)
        except Exception as e:  # gloo/NCCL raise RuntimeError (or DistError) on a dead peer or a timeout
            self.failed = e
            raise GroupError(f"a collective of the aggregation group failed (a rank died or stopped answering): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        self._last = time.monotonic()
        return out

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS / 4):
            if time.monotonic() - self._last < TICK_SECONDS or self.failed is not None:
                continue
            with self.lock:
                try:
                    self.send(NOOP)
                except GroupError as e:
                    log.error("%s", e)
                    return

    def close(self) -> None:
        """Stop the ticker (the group failed: nothing more is sent on it)."""
        self._stop.set()
        if self._ticker is not threading.current_thread():
            self._ticker.join(timeout=5)

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            if self.failed is None:
                try:
                    self.send(STOP)
                except GroupError as e:
                    log.error("%s", e)


def report_rows(rnd: Optional[Round]) -> torch.Tensor:
    """This rank's upload states for the open round, ``[m, 5]`` int64 (m >= 1: a row of
    -1 when there is nothing, since gloo takes no zero-size collectives)."""
    out = []
    if rnd is not None:
        for n in sorted(rnd.selected):
            up = rnd.uploads.get(n)
            if up is not None:
                out.append([index_of(n), DONE, up.num_samples, up.num_bytes, int(up.seconds * 1e6)])
            elif n in rnd.broken:
                out.append([index_of(n), BROKEN, 0, 0, 0])
            elif n in rnd.in_flight:
                out.append([index_of(n), IN_FLIGHT, 0, 0, 0])
    return torch.tensor(out or [[-1, 0, 0, 0, 0]], dtype=torch.int64)


class Leader:
    """Rank 0's side of the group (with ``W > 1``): the coordinator calls :meth:`open`,
    :meth:`seal`, :meth:`gather`, :meth:`recover` and :meth:`stop`; polls run in a
    thread while a round is open."""

    def __init__(self, coord: Any, group: AggregationGroup, roster: Roster, addresses: list[str]) -> None:
        self.c, self.group, self.roster = coord, group, roster
        self.device = coord.device
        self.addresses = dict(zip(roster.members, addresses))  # original id -> ingest address
        self.commands = Commands(group, self.device)
        self.assignment = Assignment(len(roster.members))
        self._poller: Optional[threading.Thread] = None
        self._round_open = threading.Event()
        self.rank_rows: dict[str, int] = {}  # node -> the rank that holds its upload (this round)
        self.failures: list[dict[str, Any]] = []

    @property
    def world(self) -> int:
        return len(self.roster.members)

    # ----- joins ------------------------------------------------------------------
    def ingest_address_for(self, node_id: str) -> str:
        rid = self.assignment.rank_of(node_id)
        return self.c.ingest_address if rid == 0 else self.addresses[rid]

    def owner(self, node_id: str) -> int:
        """The current rank of the node's ingest rank (0 when not assigned yet)."""
        rid = self.assignment.known(node_id)
        return 0 if rid is None or rid not in self.roster.members else self.roster.members.index(rid)

    # ----- rounds -----------------------------------------------------------------
    def open(self, rnd: Round) -> None:
        c = self.c
        self.rank_rows = {}
        sel = sorted(rnd.selected)
        table = torch.tensor([[index_of(n), self.owner(n)] for n in sel], dtype=torch.int64)
        timeout_ms = int(max(0.0, rnd.deadline - time.monotonic()) * 1000)
        with self.commands.lock:
            self.commands.send(OPEN, rnd.round_id, rnd.model_version, len(sel), timeout_ms, torch.get_num_threads(),
                               rnd.attempt)
            self.commands.call(self.group.broadcast_, c.model.weights.to(self.device, torch.float32).contiguous())
            self.commands.call(self.group.broadcast_, table.to(self.device))
        self._round_open.set()
        self._poller = threading.Thread(target=self._poll_loop, args=(rnd,), name="group-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self, rnd: Round) -> None:
        while self._round_open.is_set() and not rnd.closed:
            try:
                self.poll(rnd, seal=False)
            except GroupError as e:
                log.error("%s", e)
                self.c.keeper.close_now(f"failed: {e}")  # the driver's seal then raises it
                return
            time.sleep(POLL_SECONDS)

    def poll(self, rnd: Round, seal: bool) -> None:
        with self.commands.lock:
            self.commands.send(POLL, rnd.round_id, int(seal))
            mine = report_rows(None)  # the leader's own uploads are in its ledger already
            rows, sizes = self.commands.call(self.group.gather_rows, mine.to(self.device))
        rows = rows.cpu()
        start = sizes[0]
        for rank, size in enumerate(sizes[1:], start=1):
            for idx, state, samples, nbytes, micros in rows[start:start + size].tolist():
                if idx < 0:
                    continue
                node = self.c.node_id_of_index(idx)
                self.rank_rows[node] = rank
                up = Upload(node, samples, nbytes, micros / 1e6) if state == DONE else None
                self.c.keeper.mirror(rnd.round_id, node, STATE_NAMES[state], up, after_close=seal)
            start += size

    def seal(self, rnd: Round) -> None:
        """The round closed on the leader: stop polling, seal it on every rank and take
        the other ranks' last upload states into the ledger."""
        self._stop_polling()
        self.poll(rnd, seal=True)

    def _stop_polling(self) -> None:
        self._round_open.clear()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join()
        self._poller = None

    def gather(self, rnd: Round, manifest_nodes: list[str], counts: list[int]) -> torch.Tensor:
        """Send the manifest (nodes in canonical order, their trusted sample counts) and
        gather its rows (``[k, d]``, in the manifest's order) onto every rank. No nodes:
        the other ranks just drop the round (it was abandoned)."""
        c = self.c
        table = torch.tensor([[index_of(n), self.rank_rows.get(n, 0), k] for n, k in zip(manifest_nodes, counts)]
                             or [[-1, 0, 0]], dtype=torch.int64)
        with self.commands.lock:
            self.commands.send(CLOSE, rnd.round_id, rnd.model_version, len(manifest_nodes))
            self.commands.call(self.group.broadcast_, table.to(self.device))
            if not manifest_nodes:
                return torch.empty(0, c.layout.d)
            local = [n for n in manifest_nodes if self.rank_rows.get(n, 0) == 0]
            return self.commands.call(gather_manifest, self.group, c, table, local)

    # ----- failures -----------------------------------------------------------------
    def recover(self, error: GroupError) -> dict[str, Any]:
        """Re-form the group without the ranks that failed (gloo); returns what happened
        (for the metrics). Raises the error again where the group cannot re-form (NCCL,
        or no other rank answered the roll call)."""
        self._stop_polling()
        if self.device.type == "cuda":
            raise GroupError(f"{error}; NCCL groups are not re-formed: resume the run from its last "
                             "checkpoint with --run-dir") from error
        t0 = time.monotonic()
        self.commands.close()
        gone = self.roster.reform(self.group)
        addresses = exchange_addresses(self.group, self.c.ingest_address, self.device)
        self.addresses = dict(zip(self.roster.members, addresses))
        moved = self.assignment.remove(gone)
        self.c.membership.force_rejoin(moved)  # they re-join and are handed a live rank's address
        self.commands = Commands(self.group, self.device)
        info = {"ranks_lost": gone, "ranks": list(self.roster.members), "generation": self.roster.generation,
                "nodes_moved": len(moved), "moved": [self.c.name_of(n) for n in moved], "seconds": round(time.monotonic() - t0, 3),
                "error": str(error)[:300]}
        self.failures.append(info)
        log.warning("aggregation group re-formed without rank(s) %s: %d rank(s) left, %d node(s) move",
                    gone, self.world, len(moved))
        return info

    def stop(self) -> None:
        """The run is over: tell the other ranks (``STOP``) and leave the group."""
        self._stop_polling()
        self.commands.stop()
        self.commands.close()
        self.group.close()


def gather_manifest(group: AggregationGroup, c: Any, table: torch.Tensor, local: list[str]) -> torch.Tensor:
    """This rank's rows of the manifest (``local``, canonical order) gathered with every
    other rank's into the manifest's ``[k, d]`` on every rank (``table[:, 1]``: the rank
    holding each row)."""
    rows = c.store.take(local) if local else torch.zeros(1, c.layout.d)  # (gloo: no zero-size collectives)
    full, sizes = group.gather_rows(rows.to(c.device))
    owners = table[:, 1].tolist()
    # rank-major positions of each manifest entry in ``full`` (each rank's rows in manifest order)
    base, seen, pos = [], [0] * group.world_size, []
    acc = 0
    for s in sizes:
        base.append(acc)
        acc += s
    for r in owners:
        pos.append(base[r] + seen[r])
        seen[r] += 1
    return full.index_select(0, torch.tensor(pos, dtype=torch.long, device=full.device))


# --------------------------------------------------------------------------- other ranks

class RankMembership:
    """An ingest rank's session check: a token verified from the run's key (no state, no
    round trip); joins and heartbeats belong to the leader."""

    def __init__(self, keys: SessionKeys, names: dict[int, str], lease_seconds: float, rank: int) -> None:
        self.keys, self.names, self.lease_seconds, self.rank = keys, names, lease_seconds, rank

    def authenticate(self, node_id: str, token: str, *, require_alive: bool = True):
        try:
            self.keys.verify(node_id, token)  # (expired: its own message, as at the leader)
        except TokenRefused as e:
            raise Refusal("unauthenticated", str(e)) from None
        if index_of(node_id) not in self.names:
            raise Refusal("unauthenticated", "session token does not belong to this node id")
        return _Seen(node_id, self.names[index_of(node_id)])

    def _elsewhere(self, *args, **kwargs):
        raise Refusal("wrong_endpoint", f"this is aggregation rank {self.rank}, an ingest endpoint: join, heartbeat "
                                        "and leave at the leader (the address you joined at)")

    check_token = join = heartbeat = leave = _elsewhere

    def alive(self) -> list:
        return []

    def expire(self) -> list:
        return []

    def is_alive(self, node_id: str) -> bool:
        return True

    def get(self, node_id: str):
        return None

    def drain_events(self) -> list:
        return []


@dataclass
class _Seen:
    node_id: str
    name: str


class Follower:
    """The command loop of a non-leader rank."""

    def __init__(self, coord: Any, group: AggregationGroup, roster: Roster) -> None:
        self.c, self.group, self.roster = coord, group, roster
        self.device = coord.device

    def _header(self) -> list[int]:
        h = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        self.group.broadcast_(h)
        return h.cpu().tolist()

    def run(self) -> int:
        while True:
            try:
                return self._loop()
            except (GroupError, RuntimeError) as e:  # a collective failed: a rank (maybe the leader) died
                log.warning("rank %d: a collective failed (%s); answering the roll call",
                            self.c.rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.c.keeper.close_now("the aggregation group failed")
                self.c.store.drop()
            if self.device.type == "cuda":
                log.error("rank %d: NCCL groups are not re-formed; stopping", self.c.rank)
                return 1
            try:
                self.roster.reform(self.group)
                exchange_addresses(self.group, self.c.ingest_address, self.device)
            except (GroupError, RuntimeError) as e:
                log.error("rank %d: %s", self.c.rank, e)
                return 1
            self.c.rank = self.roster.rank
            log.warning("rank %d (originally %d) of %d after the group re-formed (generation %d)",
                        self.c.rank, self.roster.rid, len(self.roster.members), self.roster.generation)

    def _loop(self) -> int:
        c = self.c
        while True:
            cmd, a, b, k, timeout_ms, threads, attempt = self._header()
            if cmd == NOOP:
                continue
            if cmd == STOP:
                return 0
            if cmd == OPEN:
                if threads > 0 and threads != torch.get_num_threads():
                    # the leader's thread count: a rule run on every rank (not split) then reduces
                    # in the same order everywhere, so its state stays the same on every rank
                    torch.set_num_threads(threads)
                self._open(a, b, k, timeout_ms, attempt)
            elif cmd == POLL:
                if b:
                    c.keeper.close_now("closed by the leader")
                    c.store.seal()
                self.group.gather_rows(report_rows(c.keeper.current).to(self.device))
            elif cmd == CLOSE:
                self._close(a, k)
            else:
                raise GroupError(f"unknown command {cmd} from the leader")

    def _open(self, round_id: int, version: int, n: int, timeout_ms: int, attempt: int = 0) -> None:
        c = self.c
        weights = torch.empty(c.layout.d, dtype=torch.float32, device=self.device)
        self.group.broadcast_(weights)
        table = torch.empty(n, 2, dtype=torch.int64, device=self.device)
        self.group.broadcast_(table)
        c.model.weights, c.model.version = weights.cpu(), version
        pairs = table.cpu().tolist()
        mine = [c.node_id_of_index(i) for i, r in pairs if r == c.rank]
        c.store.open_round(sorted(mine))
        rnd = c.keeper.open(round_id, version, set(mine), timeout_ms / 1000.0, quorum=1.0)
        rnd.size, rnd.attempt = n, attempt
        c.owners = {c.node_id_of_index(i): r for i, r in pairs}
        c.round_id = round_id

    def _close(self, round_id: int, k: int) -> None:
        c = self.c
        table = torch.empty(max(1, k), 3, dtype=torch.int64, device=self.device)
        self.group.broadcast_(table)
        try:
            if k == 0:
                return
            table = table.cpu()
            nodes = [c.node_id_of_index(i) for i in table[:, 0].tolist()]
            local = [n for n, r in zip(nodes, table[:, 1].tolist()) if r == c.rank]
            rows = gather_manifest(self.group, c, table, local)
            from .pipeline import Manifest
            manifest = Manifest(tuple(c.name_of(n) for n in nodes), tuple(table[:, 2].tolist()))
            c.pipeline.defend(c.model, round_id, rows, manifest)
        finally:
            c.store.drop()


# --------------------------------------------------------------------------- rank 0

def lead(scenario, spec: GroupSpec, make_coordinator, serve_coordinator):
    """Rank 0's start with several ranks: form the group (sharing the run's key), build
    the coordinator on it (``make_coordinator(keys=..., group=...)``), start its server
    (``serve_coordinator(coord) -> (server, port)``), learn every rank's ingest address
    and attach the :class:`Leader`. Returns ``(coord, server, port)``."""
    device = pick_device(scenario.aggregation.device)
    group, keys, roster = form(spec, device, scenario.aggregation.timeout_seconds, encrypt=rank_encryption(scenario))
    coord = make_coordinator(keys=keys, group=group)
    path = pick_gather(group, scenario, spec.mpi_comm, coord.layout.d, device)
    server, port = serve_coordinator(coord)
    try:
        addresses = exchange_addresses(group, coord.ingest_address, device)
    except Exception:
        server.stop(grace=0)
        raise
    coord.leader = Leader(coord, group, roster, addresses)
    log.info("aggregation group of %d ranks; ingest endpoints %s; rows gather through %s", spec.world, addresses,
             path)
    return coord, server, port


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_ranks(scenario_path: Path, run_dir: Path, world: int, spawn) -> GroupSpec:
    """Ranks 1 .. world-1 of a group on this machine, as child processes
    (``python -m orchestrator rank``; ``spawn(name, argv, log_path, env)`` starts and tracks
    one by PID; logs and PIDs under ``run_dir/ranks/``); rank 0's :class:`GroupSpec`."""
    import sys
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    key = new_group_key()  # the run's group secret: in the ranks' environment, never argv or logs
    for r in range(1, world):
        proc = spawn(f"rank-{r}", [sys.executable, "-m", "orchestrator", "rank", "--rank", str(r), "--world",
                                   str(world), "--rendezvous", rendezvous, "--run-dir", str(run_dir),
                                   str(scenario_path)],
                     run_dir / "ranks" / f"rank-{r}.log", {GROUP_KEY_ENV: key.hex()})
        (run_dir / "ranks" / f"rank-{r}.pid").write_text(f"{proc.pid}\n")
    return GroupSpec(0, world, rendezvous, group_key=key)
