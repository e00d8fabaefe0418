"""Membership: join, heartbeat, leave, lease expiry. No gRPC inside.

A node is identified by its operator-chosen name and proves re-joins with a
secret of its own; a re-join with the same credentials is idempotent (same node
id, same session token, fresh lease), with other credentials it is refused.

The federation token is checked before anything else of a join is looked at
(:meth:`Membership.check_token`). A join under a name that another holder of the
federation token already holds (other node secret) is refused with
:class:`NameTaken`; each such conflict is counted (:attr:`Membership.name_conflicts`)
and logged as a warning naming the node (once per name per minute). Without enrolled
names any holder of the federation token can claim a roster name that has not joined
yet, and the real node is told so and exits (``fednode.node``); with ``security.enrol``
a join must present its name's enrolment secret as its node secret (``enrolment``), so
no name can be squatted or taken over with the federation token alone.

Session tokens carry their epoch (``identity.SessionKeys``): :meth:`Membership.heartbeat`
hands a node a fresh token when the epoch has turned, an expired one is refused
(``unauthenticated``, "session token expired") and the node re-joins with its secret.

Revocation (``revocation.py``; :attr:`Membership.revoked`, set by ``servicer.serve``): a
revoked name's join is refused (``permission_denied`` "node 'x' is revoked", whatever its
secret), its session is refused at its next authenticated call (which evicts it), and
:meth:`Membership.expire` evicts every live revoked member, so the next selection never
picks it. Such an eviction is the event ``("evict", id)`` followed by ``("revoked", id)``;
:attr:`Membership.evict_reasons` keeps each evicted node's last reason ("lease",
"revoked", "rank-left").
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import Refusal
from .identity import SessionKeys, TokenRefused

log = logging.getLogger("orchestrator.membership")

NAME_TAKEN = "name-taken"
"""The ``byzfed-refusal`` trailing metadata value the servicer attaches to a :class:`NameTaken`."""
CONFLICT_LOG_SECONDS = 60.0


class NameTaken(Refusal):
    """A join under a roster name that another holder of the federation token holds
    (other node secret): ``unauthenticated``."""

    def __init__(self, name: str) -> None:
        super().__init__("unauthenticated", f"node name {_echo(name)} is taken by another holder of the federation "
                                            "token: a node with other credentials joined under it")
        self.name = name


def _echo(text: str, n: int = 40) -> str:
    """``repr`` of at most ``n`` characters of untrusted ``text`` (never echo unbounded input)."""
    return repr(text) if len(text) <= n else f"{text[:n]!r}... ({len(text)} chars)"


@dataclass
class Member:
    node_id: str
    name: str
    secret_digest: bytes
    token: str
    num_samples: int
    lease_expiry: float
    joined_round: int
    alive: bool = True
    joins: int = 1
    info: dict = field(default_factory=dict)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Membership:
    def __init__(self, federation_token: str, lease_seconds: float, clock: Callable[[], float] = time.monotonic,
                 keys: Optional[SessionKeys] = None, index_of: Optional[Callable[[str], int]] = None,
                 enrolment=None) -> None:
        """``keys`` and ``index_of`` (a roster name -> its index): node ids derived from the
        run's key (``identity.SessionKeys``), so that every aggregation rank can verify a
        session; without them, random ids (unit tests, tools). Session tokens always come
        from ``keys`` (a random key by default). ``enrolment``: an ``enrolment.Enrolment``
        whose secrets joins must present (None: any node secret proves re-joins)."""
        self._federation_token = federation_token
        self._derive_ids = keys is not None and index_of is not None
        self._keys, self._index_of = keys or SessionKeys(), index_of
        self.enrolment = enrolment
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._by_name: dict[str, Member] = {}
        self._by_id: dict[str, Member] = {}
        self.events: list[tuple[str, str]] = []  # (event, node_id) since last drain
        self.name_conflicts: dict[str, int] = {}  # name -> joins refused because another node holds the name
        self._conflict_logged: dict[str, float] = {}
        self.revoked: Optional[Callable[[str], bool]] = None
        """Whether a node name is revoked (``revocation.Revocations.name_revoked``; None: none is)."""
        self.evict_reasons: dict[str, str] = {}
        """node id -> why it was last evicted: "lease", "revoked" or "rank-left"."""

    def _is_revoked(self, name: str) -> bool:
        return self.revoked is not None and self.revoked(name)

    def _refuse_revoked(self, member: Member) -> None:
        """Evict ``member`` (reason "revoked") if it is alive, and refuse its call."""
        from .revocation import Revoked, name_message
        with self._lock:
            self._evict_locked(member, "revoked")
        raise Revoked(name_message(member.name))

    def _evict_locked(self, m: Member, reason: str) -> bool:
        if not m.alive:
            return False
        m.alive = False
        self.events.append(("evict", m.node_id))
        if reason == "revoked":
            self.events.append(("revoked", m.node_id))
        self.evict_reasons[m.node_id] = reason
        if reason == "revoked":
            log.warning("node %s (%s) is revoked: evicted", _echo(m.name), m.node_id)
        return True

    def check_token(self, federation_token: str) -> None:
        """Refuse a wrong federation token (``unauthenticated``), whatever else the join says."""
        if not hmac.compare_digest(federation_token.encode(), self._federation_token.encode()):
            raise Refusal("unauthenticated", "federation token is wrong")

    def join(self, name: str, secret: str, federation_token: str, num_samples: int, current_round: int,
             info: dict | None = None) -> tuple[Member, bool]:
        self.check_token(federation_token)
        if not name or len(name) > 128 or not secret:
            raise Refusal("invalid", "node name (1-128 chars) and node secret are required")
        if self._is_revoked(name):  # (whatever its secret: a revoked enrolment secret stops working)
            from .revocation import Revoked, name_message
            raise Revoked(name_message(name))
        if self.enrolment is not None:
            self.enrolment.check(name, secret)  # (before the name is looked at: squatting is refused too)
        with self._lock:
            member = self._by_name.get(name)
            if member is not None:
                if not hmac.compare_digest(member.secret_digest, _digest(secret)):
                    self._conflict(name)
                    raise NameTaken(name)
                member.lease_expiry = self._clock() + self.lease_seconds
                if not member.alive:
                    member.joined_round = current_round
                    self.events.append(("join", member.node_id))
                member.alive = True
                member.joins += 1
                member.token = self._keys.token(member.node_id)  # (of the current epoch)
                member.num_samples = num_samples
                return member, True
            if self._derive_ids:
                node_id = self._keys.node_id(self._index_of(name), name)
            else:
                node_id = f"n{len(self._by_name):04d}-{secrets.token_hex(3)}"
            token = self._keys.token(node_id)
            member = Member(node_id=node_id, name=name, secret_digest=_digest(secret), token=token,
                            num_samples=num_samples, lease_expiry=self._clock() + self.lease_seconds,
                            joined_round=current_round, info=dict(info or {}))
            self._by_name[name] = member
            self._by_id[node_id] = member
            self.events.append(("join", node_id))
            return member, False

    def _conflict(self, name: str) -> None:
        """Count (and log, at most once per name per minute) a join refused because the name is taken."""
        n = self.name_conflicts[name] = self.name_conflicts.get(name, 0) + 1
        now = self._clock()
        if now - self._conflict_logged.get(name, -CONFLICT_LOG_SECONDS) >= CONFLICT_LOG_SECONDS:
            self._conflict_logged[name] = now
            log.warning("name conflict: a join as node %s with other credentials was refused (the name is held by "
                        "another holder of the federation token, node id %s); %d such join(s) refused so far",
                        _echo(name), self._by_name[name].node_id, n)

    def authenticate(self, node_id: str, token: str, *, require_alive: bool = True) -> Member:
        try:
            self._keys.verify(node_id, token)
        except TokenRefused as e:
            raise Refusal("unauthenticated", str(e)) from None
        with self._lock:
            member = self._by_id.get(node_id)
            if member is None:
                raise Refusal("unauthenticated", "session token does not belong to this node id")
        if self._is_revoked(member.name):  # (its session tokens stop working)
            self._refuse_revoked(member)
        with self._lock:
            if require_alive and not member.alive:
                raise Refusal("not_found", f"node {node_id} is not a member (left or lease expired); join again")
            return member

    def heartbeat(self, node_id: str, token: str) -> Member:
        """Renew the lease; ``member.token`` is then of the current epoch (a fresh one when
        ``token`` is older: the caller hands it to the node when it differs from ``token``)."""
        member = self.authenticate(node_id, token)
        with self._lock:
            member.lease_expiry = self._clock() + self.lease_seconds
            member.token = self._keys.token(node_id)  # (one per node and epoch)
        return member

    def leave(self, node_id: str, token: str) -> None:
        member = self.authenticate(node_id, token, require_alive=False)
        with self._lock:
            if member.alive:
                member.alive = False
                self.events.append(("leave", node_id))

    def expire(self) -> list[Member]:
        """Evict the live members whose lease ran out (reason "lease") or whose name is
        revoked (reason "revoked"); the evicted."""
        now = self._clock()
        with self._lock:
            live = [m for m in self._by_id.values() if m.alive]
        revoked = {m.node_id for m in live if self._is_revoked(m.name)}  # (outside the lock: may read the file)
        with self._lock:
            gone = [m for m in live if m.alive and (m.node_id in revoked or m.lease_expiry < now)]
            for m in gone:
                self._evict_locked(m, "revoked" if m.node_id in revoked else "lease")
            return gone

    def force_rejoin(self, node_ids: list[str]) -> None:
        """Make these nodes join again (their next heartbeat is answered ``not_found``): the
        aggregation rank that served them left the group, and a re-join hands them another."""
        with self._lock:
            for n in node_ids:
                m = self._by_id.get(n)
                if m is not None:
                    self._evict_locked(m, "rank-left")

    def alive(self) -> list[Member]:
        with self._lock:
            return [m for m in self._by_id.values() if m.alive]

    def members(self) -> list[Member]:
        """Every node that ever joined, alive or not."""
        with self._lock:
            return list(self._by_id.values())

    def is_alive(self, node_id: str) -> bool:
        with self._lock:
            m = self._by_id.get(node_id)
            return bool(m and m.alive and m.lease_expiry >= self._clock())

    def get(self, node_id: str) -> Member | None:
        with self._lock:
            return self._by_id.get(node_id)

    def drain_events(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self.events = self.events, []
            return out
