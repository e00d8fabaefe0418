"""gRPC edge of the orchestrator: adapts messages, maps refusals to status codes, and
keeps what a client sends from stalling or poisoning the federation.

Thin by design: every decision about membership, rounds and updates is made by
membership, the round ledger and the ingest path (``ingest.Ingest``, which decodes
uploads straight into the row store); this module parses messages, checks their
sizes and fields, enforces the call limits (:class:`Limits`), delegates and maps
refusals to status codes.

The server is gRPC's asyncio server (``grpc.aio``) on its own event loop in a
background thread (:class:`Server`): an open call is a suspended coroutine, never a
thread, so idle or hostile streams cannot starve heartbeats and honest uploads.
Nothing blocking runs on the loop: ledger waits are polled (a waker checks the
ledger every ``poll_seconds`` and wakes the long-polls when it changed), and the
per-upload finiteness check and the weights' serialisation run on a small executor.

Every handler gets the raw request bytes (no deserializer is registered) and parses
them itself, so a message the protobuf runtime cannot decode (e.g. a string field
that is not UTF-8) is an ``INVALID_ARGUMENT`` with the orchestrator's own message,
and a request over its size limit is refused before it is parsed.
"""
from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import math
import threading
import time
from concurrent import futures
from dataclasses import dataclass, fields
from typing import Any, Optional

import grpc
from google.protobuf.message import DecodeError

from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.tls import ServerTls, add_port

from .addresses import advertised_address, host_port
from .coordinator import Coordinator
from .errors import Refusal
from .longpoll import RECHECK_SECONDS, Waker
from .enrolment import NOT_ENROLLED, NotEnrolled
from .membership import NAME_TAKEN, NameTaken
from .revocation import REVOKED, Revocations, Revoked, cert_message, name_message

log = logging.getLogger("orchestrator.servicer")

STATUS = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "stale": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "checksum": grpc.StatusCode.DATA_LOSS,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "broken_stream": grpc.StatusCode.CANCELLED,
    "wrong_endpoint": grpc.StatusCode.FAILED_PRECONDITION,
}
PROTOCOL_VERSION = 2
"""2: uploads echo their task's ``upload_nonce``. A version-1 client is refused at ``Join``."""
MAX_WAIT_SECONDS = 20.0
"""A ``GetTask`` long-poll waits at most this long (a longer ``wait_seconds`` is clamped)."""
SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name


@dataclass(frozen=True)
class Limits:
    """What one client may cost the orchestrator. A call over a limit is refused (or cut)
    with ``RESOURCE_EXHAUSTED`` and a message naming the limit; a malformed or
    out-of-range field is an ``INVALID_ARGUMENT``."""

    first_message_seconds: float = 10.0
    """An upload stream must send its header within this long of its start (at least: a
    burst of such streams is cut at most ``cuts_per_second`` at a time, oldest first)."""
    cuts_per_second: int = 100
    idle_seconds: float = 15.0
    """An upload stream that sends no chunk, or a task stream the client does not read, for
    this long is cut."""
    max_unauthenticated_streams: int = 2048
    """Upload streams waiting for their header (no token seen yet), in total. A new one
    beyond it evicts the oldest waiting one (an honest header arrives within milliseconds)."""
    tasks_per_node: int = 2
    """Open ``GetTask`` calls of one node; a new one beyond it evicts the node's oldest (at
    most one eviction per node every ``evict_seconds``; beyond that it is refused)."""
    evict_seconds: float = 1.0
    unread_per_node: int = 4
    """Task streams of one node that ended on the orchestrator's side (cut, evicted) but that
    the client has not read to their end; beyond it the node's new ``GetTask`` calls are
    refused. (Such a stream keeps up to its flow-control window of chunks queued.)"""
    uploads_per_node: int = 2
    """Open ``PushUpdate`` streams of one node (past its header); a new one beyond it is refused."""
    max_calls: int = 0
    """Open authenticated long calls (task and upload streams) in total; a new one beyond it is
    refused. 0: ``max(256, (tasks_per_node + uploads_per_node) * roster size)``."""
    refusal_delay_seconds: float = 2.0
    """A call refused for a per-node or total cap is answered after this delay (so a client
    that retries at once cannot make the orchestrator refuse calls in a tight loop)."""
    max_delayed_refusals: int = 1024
    """Refusals waiting out their delay, in total; beyond it refusals are answered at once."""
    max_join_bytes: int = 16 << 10
    """Largest ``JoinRequest`` (serialised bytes)."""
    max_request_bytes: int = 4 << 10
    """Largest ``Heartbeat``, ``Leave`` and ``GetTask`` request."""
    max_name_chars: int = 128
    max_secret_chars: int = 256
    """Node secret and federation token."""
    max_id_chars: int = 128
    """Node id, session token, upload nonce, layout hash, device."""
    max_text_chars: int = 1024
    """Free text (a ``Leave`` reason)."""
    max_dtype_chars: int = 16
    max_shape_dims: int = 8
    max_wait_field: float = 3600.0
    """``wait_seconds`` above this (or negative, NaN, infinite) is refused, not clamped."""
    max_cpu_cores: int = 1 << 16
    poll_seconds: float = 0.02
    """How often the waker looks at the ledger for long-polls."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not (math.isfinite(v) and v > 0):
                raise ValueError(f"Limits.{f.name} must be a positive finite number of seconds, got {v!r}")
            if isinstance(v, int) and f.name != "max_calls" and v <= 0:
                raise ValueError(f"Limits.{f.name} must be positive, got {v!r}")
        if self.max_calls < 0:
            raise ValueError(f"Limits.max_calls must be >= 0 (0: derived from the roster), got {self.max_calls}")

    def total_calls(self, roster_size: int) -> int:
        return self.max_calls or max(256, (self.tasks_per_node + self.uploads_per_node) * roster_size)


class EdgeRefusal(Exception):
    """A refusal decided at the edge (limits, parsing), with its status code and the
    reason an upload's refusal is counted under in the round's metrics."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, delay: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.delay = delay
        """Answer the refusal after this many seconds (a cap's refusal: see ``Limits.refusal_delay_seconds``)."""


def echo(text: str, n: int = 40) -> str:
    """``repr`` of at most ``n`` characters of untrusted ``text`` (never echo unbounded input)."""
    return repr(text) if len(text) <= n else f"{text[:n]!r}... ({len(text)} chars)"


def _invalid(message: str) -> EdgeRefusal:
    return EdgeRefusal(grpc.StatusCode.INVALID_ARGUMENT, message, "invalid")


def _exhausted(message: str, reason: str = "limit") -> EdgeRefusal:
    return EdgeRefusal(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason)


def parse(cls, raw: bytes, limit: int, limit_name: str):
    """``cls`` parsed from ``raw``: over ``limit`` bytes is RESOURCE_EXHAUSTED, undecodable
    (a corrupt field, a string that is not UTF-8) is INVALID_ARGUMENT."""
    if len(raw) > limit:
        raise _exhausted(f"{cls.__name__} of {len(raw)} bytes is over the limit of {limit} bytes ({limit_name})",
                         "too_large")
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise _invalid(f"malformed {cls.__name__}: not a valid protobuf message (a corrupt field, or a string "
                       "field that is not UTF-8)") from None


def check_chars(what: str, text: str, limit: int, limit_name: str) -> None:
    if len(text) > limit:
        raise _invalid(f"{what} is {len(text)} chars, over the limit of {limit} ({limit_name}): {echo(text)}")


def check_wait(wait: float, limits: Limits) -> float:
    """A ``wait_seconds`` field: finite, 0 <= w <= ``max_wait_field``; clamped to :data:`MAX_WAIT_SECONDS`."""
    if not math.isfinite(wait) or wait < 0 or wait > limits.max_wait_field:
        raise _invalid(f"wait_seconds must be a finite number of seconds in [0, {limits.max_wait_field:g}], "
                       f"got {wait!r}")
    return min(wait, MAX_WAIT_SECONDS)


def check_session(s: pb.Session, limits: Limits) -> None:
    check_chars("session.node_id", s.node_id, limits.max_id_chars, "max_id_chars")
    check_chars("session.session_token", s.session_token, limits.max_id_chars, "max_id_chars")


def check_join(req: pb.JoinRequest, limits: Limits) -> None:
    """Lengths and ranges of a join's fields (after its federation token was checked)."""
    cred = req.credentials
    check_chars("credentials.node_name", cred.node_name, limits.max_name_chars, "max_name_chars")
    check_chars("credentials.node_secret", cred.node_secret, limits.max_secret_chars, "max_secret_chars")
    check_chars("device", req.device, limits.max_id_chars, "max_id_chars")
    if req.num_samples < 0:
        raise _invalid(f"num_samples must be >= 0, got {req.num_samples}")
    if not 0 <= req.cpu_cores <= limits.max_cpu_cores:
        raise _invalid(f"cpu_cores must be in [0, {limits.max_cpu_cores}], got {req.cpu_cores}")


def check_update_header(h: pb.UpdateHeader, limits: Limits) -> None:
    """Lengths and ranges of an upload header's fields (before it is authenticated)."""
    check_session(h.session, limits)
    check_chars("layout_hash", h.layout_hash, limits.max_id_chars, "max_id_chars")
    check_chars("upload_nonce", h.upload_nonce, limits.max_id_chars, "max_id_chars")
    check_chars("tensor.dtype", h.tensor.dtype, limits.max_dtype_chars, "max_dtype_chars")
    if len(h.tensor.shape) > limits.max_shape_dims:
        raise _invalid(f"tensor.shape has {len(h.tensor.shape)} dimensions, over the limit of "
                       f"{limits.max_shape_dims} (max_shape_dims)")
    if h.round < 0 or h.model_version < 0:
        raise _invalid(f"round and model_version must be >= 0, got {h.round} and {h.model_version}")
    if h.num_samples <= 0:
        raise _invalid(f"num_samples must be positive, got {h.num_samples}")


# --------------------------------------------------------------------------- admission

class Ticket:
    """One admitted call: its handler's task (for eviction), when it started, why it was
    evicted (or cut), and whether the call has terminated."""

    __slots__ = ("key", "task", "evicted", "seq", "started", "done")

    def __init__(self, key: Any, task: Optional[asyncio.Task], seq: int) -> None:
        self.key, self.task, self.seq = key, task, seq
        self.started = time.monotonic()
        self.evicted = ""
        self.done = False


class Admission:
    """Counts the open calls per node and in total; admits, refuses or evicts.

    Runs on the server's event loop only (no locks); the counters are plain ints, so
    other threads may read :meth:`snapshot`."""

    def __init__(self, limits: Limits, roster_size: int) -> None:
        self.limits = limits
        self.max_total = limits.total_calls(roster_size)
        self._seq = itertools.count()
        self._preauth: collections.OrderedDict[int, Ticket] = collections.OrderedDict()
        self._by_key: dict[tuple[str, str], collections.OrderedDict[int, Ticket]] = {}  # handlers running
        self._draining: dict[tuple[str, str], dict[int, Ticket]] = {}
        """Calls whose handler returned while the call has not terminated: a task stream the
        client does not read keeps its last chunks (up to its flow-control window) queued in
        the transport, with the status behind them, until the client reads or goes away."""
        self.total = 0
        self.delayed = 0
        self._last_evict: dict[str, float] = {}
        self.preauth_max = 0
        self.counts: collections.Counter[str] = collections.Counter()
        """Limit events since start: ``refused:<limit>``, ``evicted:<limit>``, ``cut:<limit>``."""

    @property
    def preauth(self) -> int:
        return len(self._preauth)

    def snapshot(self) -> dict[str, Any]:
        return {"unauthenticated_open": len(self._preauth), "unauthenticated_max": self.preauth_max,
                "authenticated_open": self.total, "draining": sum(map(len, self._draining.values())),
                "refusals_delayed": self.delayed, **dict(self.counts)}

    def _refusal(self, limit: str, message: str) -> EdgeRefusal:
        self.counts[f"refused:{limit}"] += 1
        delay = self.limits.refusal_delay_seconds if self.delayed < self.limits.max_delayed_refusals else 0.0
        return EdgeRefusal(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "limit", delay)

    @staticmethod
    def _evict(t: Ticket, why: str) -> None:
        t.evicted = why
        task, t.task = t.task, None  # (no reference cycle ticket -> task -> frame -> ticket left behind)
        if task is not None:
            task.cancel()

    def enter_preauth(self) -> Ticket:
        lim = self.limits.max_unauthenticated_streams
        while len(self._preauth) >= lim:
            _, old = self._preauth.popitem(last=False)
            self.counts["evicted:max_unauthenticated_streams"] += 1
            self._evict(old, f"evicted: {lim} upload streams were waiting for their header "
                             f"(limit max_unauthenticated_streams = {lim}); this was the oldest")
        t = Ticket(None, asyncio.current_task(), next(self._seq))
        self._preauth[t.seq] = t
        self.preauth_max = max(self.preauth_max, len(self._preauth))
        return t

    def leave_preauth(self, t: Ticket) -> None:
        self._preauth.pop(t.seq, None)
        t.task = None

    def reap_preauth(self, now: float, at_most: int) -> int:
        """Cut (at most ``at_most`` of) the streams that sent no header within
        ``first_message_seconds``, oldest first; how many were cut. Called every few tens of
        milliseconds (:class:`Reaper`): many streams opened at once are cut over a few ticks,
        so their cut-offs never stall the loop."""
        lim = self.limits.first_message_seconds
        n = 0
        while self._preauth and n < at_most:
            seq, t = next(iter(self._preauth.items()))
            if now - t.started < lim:
                break
            del self._preauth[seq]
            self.counts["cut:first_message_seconds"] += 1
            self._evict(t, f"no UpdateHeader within {lim:g} s of the stream's start "
                           f"(limit first_message_seconds = {lim:g} s)")
            n += 1
        return n

    def enter(self, node_id: str, kind: str) -> Ticket:
        """Admit an authenticated long call of ``kind`` ("task" or "upload") of ``node_id``."""
        per_node = self.limits.tasks_per_node if kind == "task" else self.limits.uploads_per_node
        name = "tasks_per_node" if kind == "task" else "uploads_per_node"
        draining = self._draining.get((node_id, kind), {})
        if kind == "task" and len(draining) >= self.limits.unread_per_node:
            raise self._refusal("unread_per_node", f"node {node_id} has {len(draining)} task streams it has not "
                                                   f"read to their end (limit unread_per_node = "
                                                   f"{self.limits.unread_per_node}); read or cancel them first")
        open_ = self._by_key.setdefault((node_id, kind), collections.OrderedDict())
        if len(open_) >= per_node:
            what = "GetTask calls" if kind == "task" else "upload streams"
            now = time.monotonic()
            if kind != "task" or now - self._last_evict.get(node_id, -math.inf) < self.limits.evict_seconds:
                if not open_:
                    del self._by_key[(node_id, kind)]
                raise self._refusal(name, f"node {node_id} already has {len(open_)} {what} open (limit {name} = "
                                          f"{per_node}" + (f"; and evicted one less than {self.limits.evict_seconds:g} s "
                                                           "ago" if kind == "task" else "") + ")")
            self._last_evict[node_id] = now
            while len(open_) >= per_node:  # the newest poll is the one an honest node waits on
                _, old = open_.popitem(last=False)
                self.total -= 1
                self.counts[f"evicted:{name}"] += 1
                self._evict(old, f"evicted: node {node_id} opened more than {per_node} {what} "
                                 f"(limit {name} = {per_node}); this was its oldest")
        if self.total >= self.max_total:
            if not open_:
                del self._by_key[(node_id, kind)]
            raise self._refusal("max_calls", f"the orchestrator has {self.total} calls open (limit max_calls = "
                                             f"{self.max_total}); try again later")
        t = Ticket((node_id, kind), asyncio.current_task(), next(self._seq))
        open_[t.seq] = t
        self.total += 1
        return t

    def leave(self, t: Ticket) -> None:
        """The call's handler returned: it no longer counts as open; until the call has
        terminated (:meth:`terminated`) it counts as draining."""
        t.task = None
        open_ = self._by_key.get(t.key)
        if open_ is not None and open_.pop(t.seq, None) is not None:
            self.total -= 1
            if not open_:
                del self._by_key[t.key]
        if not t.done:
            self._draining.setdefault(t.key, {})[t.seq] = t

    def terminated(self, t: Ticket) -> None:
        """The call has terminated (its status reached the client, or the client went away)."""
        t.done = True
        d = self._draining.get(t.key)
        if d is not None and d.pop(t.seq, None) is not None and not d:
            del self._draining[t.key]

    def cut(self, limit: str) -> None:
        self.counts[f"cut:{limit}"] += 1


class Reaper:
    """Cuts the upload streams that sent no header in time (:meth:`Admission.reap_preauth`),
    at most ``per_tick`` every ``period`` seconds."""

    def __init__(self, admission: Admission, period: float = 0.05) -> None:
        self.admission, self.period = admission, period
        self.per_tick = max(1, round(admission.limits.cuts_per_second * period))

    async def run(self) -> None:
        while True:
            self.admission.reap_preauth(time.monotonic(), self.per_tick)
            await asyncio.sleep(self.period)


class Trimmer:
    """Gives the C heap back to the system after floods of refused requests. A burst of
    large refused messages (8 MiB each at most) is received and freed by gRPC's threads in
    many arenas: glibc kept ~100-230 MB of it after bursts of 7 MB joins on 8 connections.
    With at most two arenas (:func:`_limit_arenas`) and ``malloc_trim`` once
    ``threshold`` refused bytes came in (at most every ``period`` seconds, off the loop),
    the same bursts left 2-30 MB."""

    def __init__(self, servicer: "FederationServicer", pool: futures.Executor, period: float = 2.0,
                 threshold: int = 32 << 20) -> None:
        self.servicer, self.pool, self.period, self.threshold = servicer, pool, period, threshold
        self.trims = 0

    async def run(self) -> None:
        libc = _libc()
        while libc is not None:
            await asyncio.sleep(self.period)
            if self.servicer.refused_bytes >= self.threshold:
                self.servicer.refused_bytes = 0
                self.trims += 1
                await asyncio.get_running_loop().run_in_executor(self.pool, libc.malloc_trim, 0)


_LIBC: Any = None
M_ARENA_MAX = -8


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc has them, musl does not
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def _limit_arenas(n: int = 2) -> None:
    """At most ``n`` glibc malloc arenas for threads made from now on (gRPC's, the
    executor's): fewer places for freed request buffers to stay resident (see :class:`Trimmer`)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, n)


# Waker: see longpoll.py (a poll that can only get a task next round sleeps until then)


# --------------------------------------------------------------------------- the service

class FederationServicer:
    """The ``byzfed.v1.Federation`` service for ``grpc.aio``; handlers take raw bytes."""

    def __init__(self, coord: Coordinator, limits: Limits, pool: futures.Executor,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.coord = coord
        self.limits = limits
        self.pool = pool
        self.chunk_bytes = chunk_bytes
        self.admission = Admission(limits, len(getattr(coord, "roster", ())))
        self.waker = Waker(coord, limits.poll_seconds)
        self.reaper = Reaper(self.admission)
        self._weights: Optional[tuple[bytes, pb.TensorHeader]] = None
        self.refused_bytes = 0
        """Bytes of refused requests since the heap was last trimmed (:class:`Trimmer`)."""
        self.certificate_names = False
        """Mutual TLS: the node name of a ``Join`` must be its client certificate's CN."""
        self.revocations: Optional[Revocations] = None
        """The run's revocation list (``revocation.py``; set by :func:`serve`; None: nothing revoked)."""

    def _check_revoked(self, context, name: Optional[str] = None) -> None:
        """Refuse (:class:`Revoked`) a call on a connection whose client certificate is revoked
        (mutual TLS), or of a revoked node ``name``. Cheap: the list is looked at at most
        every second (``Revocations``), a certificate's id is computed once."""
        rev = self.revocations
        if rev is None:
            return
        if self.certificate_names:
            cid = rev.cert_revoked(_certificate_pem(context))
            if cid is not None:
                raise Revoked(cert_message(cid))
        if name is not None and rev.name_revoked(name):
            raise Revoked(name_message(name))

    # ----- plumbing -----------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Join": grpc.unary_unary_rpc_method_handler(self.Join, response_serializer=pb.JoinReply.SerializeToString),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                self.Heartbeat, response_serializer=pb.HeartbeatReply.SerializeToString),
            "Leave": grpc.unary_unary_rpc_method_handler(self.Leave,
                                                         response_serializer=pb.LeaveReply.SerializeToString),
            "GetTask": grpc.unary_stream_rpc_method_handler(self.GetTask,
                                                            response_serializer=pb.TaskChunk.SerializeToString),
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                self.PushUpdate, response_serializer=pb.PushUpdateReply.SerializeToString),
        })

    @staticmethod
    def _refuse(context, e: BaseException) -> None:
        """Set ``e``'s status on the call; the handler then returns None. (Not
        ``context.abort``: its exception leaves ~30 objects of cyclic garbage per call,
        and a flood of refused calls would then cost full garbage collections.)"""
        if isinstance(e, NameTaken):  # the node tells this from a wrong federation token
            context.set_trailing_metadata((("byzfed-refusal", NAME_TAKEN),))
        elif isinstance(e, NotEnrolled):
            context.set_trailing_metadata((("byzfed-refusal", NOT_ENROLLED),))
        elif isinstance(e, Revoked):
            context.set_trailing_metadata((("byzfed-refusal", REVOKED),))
        if isinstance(e, Refusal):
            context.set_code(STATUS[e.reason])
            context.set_details(e.message)
        else:
            context.set_code(e.code)
            context.set_details(e.message)

    def _on_termination(self, context, ticket: Ticket) -> None:
        adm = self.admission
        context.add_done_callback(lambda _ctx: adm.terminated(ticket))

    async def _refuse_later(self, context, e: BaseException) -> None:
        """:meth:`_refuse`, after ``e.delay`` seconds for a cap's refusal (no thread, no CPU meanwhile)."""
        delay = getattr(e, "delay", 0.0)
        if delay > 0:
            self.admission.delayed += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.admission.delayed -= 1
        self._refuse(context, e)

    async def _run(self, fn, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ----- unary calls ------------------------------------------------------------------
    async def Join(self, raw: bytes, context) -> pb.JoinReply:
        try:
            self._check_revoked(context)  # (a revoked certificate, whatever name the join claims)
            return self._join(raw, _certificate_name(context) if self.certificate_names else None)
        except (Refusal, EdgeRefusal) as e:
            self.refused_bytes += len(raw)
            self._refuse(context, e)

    def _join(self, raw: bytes, certificate_name: Optional[str] = None) -> pb.JoinReply:
        """``certificate_name``: the caller's client-certificate CN under mutual TLS, which the
        node name must equal (None: names are not bound to certificates)."""
        c, lim = self.coord, self.limits
        # the federation token first, whatever else the request holds (gRPC's message limit
        # bounds what reaches here); then the request's own size limit and its fields
        req = parse(pb.JoinRequest, raw, codec.MAX_MESSAGE_BYTES, "the message size limit")
        cred = req.credentials
        c.membership.check_token(cred.federation_token)
        if len(raw) > lim.max_join_bytes:
            raise _exhausted(f"JoinRequest of {len(raw)} bytes is over the limit of {lim.max_join_bytes} bytes "
                             "(max_join_bytes)", "too_large")
        check_join(req, lim)
        if req.protocol_version not in (0, PROTOCOL_VERSION):
            raise Refusal("invalid", f"protocol version {req.protocol_version} unsupported; "
                                     f"this orchestrator speaks {PROTOCOL_VERSION}")
        if cred.node_name not in c.roster or not c.roster:
            raise Refusal("permission_denied", f"node name {echo(cred.node_name)} is not in scenario "
                                               f"{echo(c.s.name)}; expected one of {echo(min(c.roster))} .. "
                                               f"{echo(max(c.roster))}")
        if certificate_name is not None and certificate_name != cred.node_name:
            raise Refusal("unauthenticated", f"node name {echo(cred.node_name)} is not the name of the client "
                                             f"certificate this connection presented ({echo(certificate_name)}): "
                                             "with security.mtls a node joins only under its certificate's name")
        workload = c.workload_for(cred.node_name)
        member, rejoined = c.membership.join(cred.node_name, cred.node_secret, cred.federation_token,
                                             req.num_samples, c.round_id,
                                             {"device": req.device, "cores": req.cpu_cores})
        c.on_event("rejoined" if rejoined else "joined", {"node": member.name})
        return pb.JoinReply(node_id=member.node_id, session_token=member.token,
                            lease_seconds=c.membership.lease_seconds, layout_json=c.layout_json,
                            layout_hash=c.layout_hash, ingest_address=c.ingest_address_for(member.node_id),
                            workload_json=workload,
                            rejoined=rejoined, current_round=c.round_id)

    async def Heartbeat(self, raw: bytes, context) -> pb.HeartbeatReply:
        try:
            self._check_revoked(context)
            return self._heartbeat(raw)
        except (Refusal, EdgeRefusal) as e:
            self.refused_bytes += len(raw)
            self._refuse(context, e)

    def _heartbeat(self, raw: bytes) -> pb.HeartbeatReply:
        c = self.coord
        req = parse(pb.HeartbeatRequest, raw, self.limits.max_request_bytes, "max_request_bytes")
        check_session(req.session, self.limits)
        if req.HasField("received_round") and req.received_round < 0:
            raise _invalid(f"received_round must be >= 0, got {req.received_round}")
        m = c.membership.heartbeat(req.session.node_id, req.session.session_token)
        if req.HasField("received_round"):
            c.keeper.mark_downloaded(m.node_id, req.received_round)
        task = c.keeper.task_for(m.node_id)
        nonce = task.nonce_of(m.node_id) if task is not None and hasattr(task, "nonces") else ""  # sync rounds only
        fresh = m.token if m.token != req.session.session_token else ""  # the epoch turned: rotate
        return pb.HeartbeatReply(lease_seconds=c.membership.lease_seconds, current_round=c.round_id,
                                 selected=task is not None, shutdown=c.shutdown.is_set(), upload_nonce=nonce,
                                 session_token=fresh)

    async def Leave(self, raw: bytes, context) -> pb.LeaveReply:
        try:
            req = parse(pb.LeaveRequest, raw, self.limits.max_request_bytes, "max_request_bytes")
            check_session(req.session, self.limits)
            check_chars("reason", req.reason, self.limits.max_text_chars, "max_text_chars")
            self.coord.membership.leave(req.session.node_id, req.session.session_token)
        except (Refusal, EdgeRefusal) as e:
            self.refused_bytes += len(raw)
            self._refuse(context, e)
            return None
        self.coord.keeper.notify()
        return pb.LeaveReply()

    # ----- task long-poll -------------------------------------------------------------
    async def _write(self, context, msg, what: str) -> None:
        idle = self.limits.idle_seconds
        try:
            await asyncio.wait_for(context.write(msg), idle)
        except asyncio.TimeoutError:
            self.admission.cut("idle_seconds")
            raise _exhausted(f"{what} was not read for {idle:g} s (limit idle_seconds = {idle:g} s); "
                             "the stream was cut") from None

    async def GetTask(self, raw: bytes, context) -> None:
        c, ticket = self.coord, None
        try:
            req = parse(pb.GetTaskRequest, raw, self.limits.max_request_bytes, "max_request_bytes")
            check_session(req.session, self.limits)
            wait = check_wait(req.wait_seconds, self.limits)
            self._check_revoked(context)  # (the connection's certificate first, as at Join)
            m = c.membership.authenticate(req.session.node_id, req.session.session_token)
            self._check_revoked(context, m.name)  # (every rank: the leader's membership checks names too)
            ticket = self.admission.enter(m.node_id, "task")
            self._on_termination(context, ticket)
            await self._serve_task(context, m.node_id, wait, m.name)
        except (Refusal, EdgeRefusal) as e:
            self.refused_bytes += len(raw)
            await self._refuse_later(context, e)
        except asyncio.CancelledError:
            if c.shutdown.is_set() and (ticket is None or not ticket.evicted):
                return  # the server is stopping (its grace ran out): the poll simply ends
            if ticket is None or not ticket.evicted:
                raise
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)  # evicted (per-node cap)
            context.set_details(ticket.evicted)
        finally:
            if ticket is not None:
                self.admission.leave(ticket)

    async def _serve_task(self, context, node_id: str, wait: float, name: Optional[str] = None) -> None:
        c = self.coord
        deadline = time.monotonic() + wait
        rnd = None
        while not c.shutdown.is_set():
            seen = self.waker.seen()  # (before looking: a change meanwhile ends the wait at once)
            rnd = c.keeper.wait_task(node_id, 0.0)  # never blocks
            left = deadline - time.monotonic()
            if rnd is not None or left <= 0:
                break
            if self.waker.only_next_round(node_id):
                await self.waker.wait(left, seen, rounds_only=True)
            else:
                await self.waker.wait(min(RECHECK_SECONDS, left), seen)
        if c.shutdown.is_set():
            await self._write(context, pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.SHUTDOWN)), "the task")
            return
        if rnd is None:
            await self._write(context, pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.WAIT, round=c.round_id)),
                              "the task")
            return
        self._check_revoked(context, name)  # (revoked while this poll waited: no task)
        # async tickets carry the weights of their version (the model may move on meanwhile)
        payload = getattr(rnd, "payload", b"") or await self._run(c.weights_payload, rnd.model_version)
        buf = memoryview(payload)
        weights = await self._weights_header(payload)
        header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, round=rnd.round_id, model_version=rnd.model_version,
                               deadline_unix=time.time() + (rnd.deadline - time.monotonic()),
                               train_json=c.train_json(rnd), layout_hash=c.layout_hash, weights=weights,
                               upload_nonce=rnd.nonce_of(node_id))
        await self._write(context, pb.TaskChunk(header=header), "the task")
        for start in range(0, len(buf), self.chunk_bytes):
            await self._write(context, pb.TaskChunk(data=bytes(buf[start:start + self.chunk_bytes])), "the task")

    async def _weights_header(self, payload: bytes) -> pb.TensorHeader:
        """The weights' header (their CRC over the whole model: computed once per payload, off the loop)."""
        cached = self._weights
        if cached is not None and cached[0] is payload:
            return cached[1]
        header = await self._run(codec.tensor_header, memoryview(payload), (len(payload) // 4,))
        self._weights = (payload, header)  # (holding the payload: its id cannot be reused meanwhile)
        return header

    # ----- uploads ----------------------------------------------------------------------
    async def _read(self, context, timeout: float, on_timeout: str, limit: str):
        try:
            return await asyncio.wait_for(context.read(), timeout)
        except asyncio.TimeoutError:
            self.admission.cut(limit)
            raise _exhausted(on_timeout) from None

    async def PushUpdate(self, request_iterator, context) -> pb.PushUpdateReply:
        c, lim, adm = self.coord, self.limits, self.admission
        pre = adm.enter_preauth()
        try:
            raw = await context.read()  # the first-message deadline: ``Admission.reap_preauth``
        except asyncio.CancelledError:
            adm.leave_preauth(pre)
            if not pre.evicted:
                raise
            # cut (first-message deadline) or evicted (cap): end the call with its status without
            # raising (an AbortError would leave ~30 objects of cyclic garbage per stream)
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(pre.evicted)
            return None
        except BaseException:  # (the transport failed the call, e.g. a message over gRPC's size cap)
            adm.leave_preauth(pre)
            raise
        adm.leave_preauth(pre)
        ticket = session = None
        try:
            try:
                if raw is grpc.aio.EOF:
                    raise Refusal("invalid", "an upload must start with an UpdateHeader")
                first = parse(pb.UpdateChunk, raw, codec.MAX_MESSAGE_BYTES, "the message size limit")
                if first.WhichOneof("payload") != "header":
                    raise Refusal("invalid", "an upload must start with an UpdateHeader")
                h = first.header
                check_update_header(h, lim)
                self._check_revoked(context)  # (the connection's certificate first, as at Join)
                member = c.membership.authenticate(h.session.node_id, h.session.session_token)
                self._check_revoked(context, member.name)
                if h.layout_hash != c.layout_hash:
                    raise Refusal("invalid", f"layout hash {echo(h.layout_hash)} does not match the model's "
                                             f"{c.layout_hash!r}")
                ticket = adm.enter(member.node_id, "upload")
                self._on_termination(context, ticket)
                receipt = c.ingest.begin(member.node_id, h.round, h.model_version, nonce=h.upload_nonce)
            except (Refusal, EdgeRefusal) as e:  # (counted for the round's metrics, as every refused upload)
                c.keeper.count_refusal(e.reason)
                self.refused_bytes += len(raw) if isinstance(raw, bytes) else 0
                raise
            session = c.ingest.session(receipt, h.tensor, h.num_samples)
            upload = await self._receive(context, session, member.name)
        except (Refusal, EdgeRefusal) as e:
            await self._refuse_later(context, e)
            return None
        except BaseException:  # cancelled (the client died or cut the stream, the server is stopping),
            if session is not None and not session.finishing:  # or the transport failed the call
                session.abort("broken_stream")
            raise
        finally:
            if ticket is not None:
                adm.leave(ticket)
        return pb.PushUpdateReply(accepted=True, round=receipt.ticket.round_id, bytes_received=upload.num_bytes,
                                  message="stored")

    async def _receive(self, context, session, name: Optional[str] = None):
        """Feed the stream's chunks to ``session`` as they arrive; finish it (off the loop),
        unless ``name`` was revoked meanwhile (an upload not yet accepted is refused)."""
        idle = self.limits.idle_seconds
        while True:
            try:
                raw = await self._read(context, idle, f"the upload sent no chunk for {idle:g} s (limit idle_seconds = "
                                                      f"{idle:g} s); the stream was cut", "idle_seconds")
            except EdgeRefusal:
                session.abort("idle")
                raise
            if raw is grpc.aio.EOF:
                break
            try:
                msg = parse(pb.UpdateChunk, raw, codec.MAX_MESSAGE_BYTES, "the message size limit")
            except EdgeRefusal:
                session.abort("invalid")
                raise
            if msg.WhichOneof("payload") != "data":
                session.abort("invalid")
                raise Refusal("invalid", "a second header inside one upload")
            session.add(msg.data)
        if session.short and await _client_gone(context):
            session.abort("broken_stream")
            raise Refusal("broken_stream", "the upload stream broke off")
        try:
            self._check_revoked(context, name)
        except Revoked:
            session.abort("permission_denied")
            raise
        # the whole stream arrived: the checks run to their end even if the client goes away now
        session.finishing = True
        return await asyncio.shield(self._run(session.finish))


async def _client_gone(context, wait: float = 0.5) -> bool:
    """Whether a stream that ended early was cut by the client's death rather than closed
    on purpose. The end of a dead client's stream can be seen before its call is cancelled
    (or, when nothing is sent to it, instead): so send it something (the initial metadata,
    which a live client awaiting its answer accepts) and then wait a moment for a
    cancellation. A cancellation of this very call raises out of here (the caller treats
    that as a broken stream too)."""
    if context.cancelled() or context.done():
        return True
    try:
        await asyncio.wait_for(context.send_initial_metadata(()), 4 * wait)
    except asyncio.TimeoutError:
        return True
    except asyncio.CancelledError:
        raise
    except Exception:  # (gRPC's ExecuteBatchError: the transport is gone)
        return True
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if context.cancelled() or context.done():
            return True
        await asyncio.sleep(0.01)
    return False


# --------------------------------------------------------------------------- the server

def grpc_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
            # find dead connections within a minute (gRPC's default: 2 hours), so the calls of a
            # client that vanished without closing its connection end and stop counting
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]


class Server:
    """The orchestrator's ``grpc.aio`` server on its own event loop in a background thread.

    ``stop(grace)`` stops it (calls still open after ``grace`` seconds are cancelled) and
    returns a ``threading.Event`` that is set once it has stopped, as ``grpc.Server.stop``."""

    def __init__(self, coord: Coordinator, limits: Limits, max_workers: int, tls: Optional[ServerTls] = None) -> None:
        self.coord = coord
        self.limits = limits
        self.tls = tls
        """The port's TLS (``[security]``; None: plaintext)."""
        self.revocations: Optional[Revocations] = None
        """The revocation list its calls are checked against (:func:`serve` sets it before ``start``)."""
        # blocking work of the calls (finiteness checks, serialising the weights): a small pool
        self.pool = futures.ThreadPoolExecutor(max_workers=max(1, min(4, max_workers)), thread_name_prefix="grpc-work")
        self.loop = asyncio.new_event_loop()
        self.servicer: Optional[FederationServicer] = None
        self.port = 0
        self._server: Optional[grpc.aio.Server] = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop_main, name="grpc-aio", daemon=True)

    def _loop_main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self.loop.close()

    def start(self, address: str) -> int:
        _limit_arenas()
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(address), self.loop).result(30)
        except BaseException:
            self._halt()
            raise
        # What is alive now (modules, torch, the dataset, the model) lives as long as the
        # process: exempt it from the cyclic collector, so a full collection (triggered by
        # what calls allocate) scans only the objects made since, not the whole heap; a
        # full collection of the orchestrator's heap takes ~0.2 s, a pause for every call.
        gc.freeze()
        return self.port

    async def _start(self, address: str) -> int:
        lim = self.limits
        self.servicer = FederationServicer(self.coord, lim, self.pool)
        hard_cap = lim.max_unauthenticated_streams + self.servicer.admission.max_total + 4096
        server = grpc.aio.server(options=grpc_options(), maximum_concurrent_rpcs=hard_cap)
        # mutual TLS: a node joins only under its client certificate's CN
        self.servicer.certificate_names = self.tls is not None and self.tls.require_client_auth
        self.servicer.revocations = self.revocations
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        from .adversary import add_adversary_view  # only with [adversary] omniscient = true (simulation only)
        self.coord.adversary_view = add_adversary_view(server, self.coord)
        bound = add_port(server, address, self.tls)
        if bound == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        loop = asyncio.get_running_loop()
        self.trimmer = Trimmer(self.servicer, self.pool)
        self._tasks = [loop.create_task(self.servicer.waker.run()), loop.create_task(self.servicer.reaper.run()),
                       loop.create_task(self.trimmer.run())]
        return bound

    def stats(self) -> dict[str, Any]:
        """The admission counters (open calls, limit events); from any thread (read on the loop)."""
        if self.servicer is None or self._stopped.is_set():
            return {}
        if threading.current_thread() is self._thread:
            return self.servicer.admission.snapshot()

        async def snap() -> dict[str, Any]:
            return self.servicer.admission.snapshot()
        return asyncio.run_coroutine_threadsafe(snap(), self.loop).result(10)

    def stop(self, grace: Optional[float] = None) -> threading.Event:
        if threading.current_thread() is self._thread:  # (from a call's handler: stop without waiting)
            threading.Thread(target=self.stop, args=(grace,), daemon=True).start()
            return self._stopped
        with self._stop_lock:
            if not self._stopped.is_set() and self._thread.is_alive():
                try:
                    if self._server is not None:
                        fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self.loop)
                        fut.result((grace or 0.0) + 15.0)
                except Exception as e:  # (a loop already gone) stop what is left anyway
                    log.warning("gRPC server stop: %s", e)
                self._halt()
            self._stopped.set()
        return self._stopped

    def _halt(self) -> None:
        for t in self._tasks:
            self.loop.call_soon_threadsafe(t.cancel)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15.0)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)


def serve(coord: Coordinator, host: str, port: int, max_workers: int,
          advertise_host: Optional[str] = None, *, limits: Optional[Limits] = None,
          tls: Any = "scenario") -> tuple[Server, int]:
    """Start the gRPC server on ``host:port`` (0 picks a free port); returns it and the port.
    Nodes are told to upload to :func:`advertised_address` (``advertise_host`` defaults to
    the scenario's ``federation.advertise_host``). ``max_workers`` bounds the small
    executor for blocking work (at most 4 threads): calls themselves hold no thread.
    ``limits``: what one client may cost (:class:`Limits`; default ``Limits()``).
    ``tls``: a :class:`proto.tls.ServerTls`, None for plaintext, or (default) what the
    scenario's ``[security]`` says (``orchestrator.security.server_tls``), so every rank's
    ingest endpoint listens like rank 0."""
    if tls == "scenario":
        tls = _scenario_tls(coord)
    server = Server(coord, limits or Limits(), max_workers, tls)
    revocations = server.revocations = _scenario_revocations(coord)
    bound = server.start(host_port(host, port))
    if revocations is not None and hasattr(coord.membership, "revoked"):  # (the leader's: joins, eviction)
        coord.membership.revoked = revocations.name_revoked
    if advertise_host is None:
        advertise_host = getattr(getattr(coord.s, "federation", None), "advertise_host", "")
    coord.ingest_address = advertised_address(host, bound, advertise_host or "")
    return server, bound


def _certificate_pem(context) -> bytes:
    """The PEM client certificate of a call's connection (b'' when none)."""
    pems = context.auth_context().get("x509_pem_cert") or [b""]
    return pems[0]


def _certificate_name(context) -> str:
    """The common name of the client certificate of a call's connection ('' when none)."""
    names = context.auth_context().get("x509_common_name") or [b""]
    return names[0].decode("utf-8", "replace")


def _scenario_revocations(coord: Coordinator) -> Optional[Revocations]:
    """The run's revocation list (``security.revoked`` or RUN_DIR/revoked.txt), read now
    (a bad line there is an error); None without a scenario and run folder (tools, tests)."""
    s, run_dir = getattr(coord, "s", None), getattr(coord, "run_dir", None)
    if s is None or run_dir is None or not hasattr(s, "security"):
        return None
    from .revocation import Revocations, path_of

    return Revocations.load(path_of(s, run_dir))


def _scenario_tls(coord: Coordinator) -> Optional[ServerTls]:
    s = getattr(coord, "s", None)
    if not getattr(getattr(s, "security", None), "enabled", False):
        return None
    from .security import server_tls

    return server_tls(s, coord.run_dir)
