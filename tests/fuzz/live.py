"""A live federation for the fuzz tests, and the checks every fuzz case must pass.

:class:`LiveFederation` runs the orchestrator's real gRPC server
(``orchestrator.servicer.serve``) in this process on 127.0.0.1 around a real
``Coordinator`` (logreg on the bundled digits: d = 650), with no round driver: the
tests open rounds themselves (as ``tests/integration/test_large_transfer.py`` does).
Its nodes are joined through the real ``FederationClient``:

* ``anchor-000``: selected in every round; it downloads its task, confirms it and
  uploads a known delta with the real client, so every round holds one honest
  upload whose row must stay intact whatever the fuzz cases send;
* ``fz-*``: selected, not uploaded yet ("busy": ``GetTask`` answers at once); each
  push case uses one of them, at most once per round;
* ``spare-*``: joined, not selected ("idle": ``GetTask`` long-polls); ``Leave`` and
  ``Join`` cases use their credentials, and they are re-joined afterwards;
* ``late-*``: in the roster, never joined by the harness (a fuzzed ``Join`` may enrol one).

Every fuzz case goes through the public gRPC interface only: the generated stubs,
or raw bytes over the channel (``Raw``: identity serializers), so the suite keeps
working when the servicer's internals change. What a case must leave alone is read
from the coordinator (:class:`State`): the open round's accepted uploads and their
rows, the global weights ``coord.model.weights`` and ``coord.model.version``.

Status codes each RPC may answer (``ALLOWED``; anything else, e.g. ``INTERNAL`` or
``UNKNOWN``, fails the case, and ``DEADLINE_EXCEEDED`` is the client's own timeout,
i.e. a hang). A refusal must carry the orchestrator's own message (not gRPC's
``Exception deserializing request!`` or a trailer that was too large to arrive):

=============  ================================================================
``Join``       OK, INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, FAILED_PRECONDITION, RESOURCE_EXHAUSTED
``Heartbeat``  OK, INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED
``Leave``      OK, INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED
``GetTask``    OK, INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED
``PushUpdate`` OK, INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION,
               ALREADY_EXISTS, DATA_LOSS, RESOURCE_EXHAUSTED
=============  ================================================================

A request the protobuf runtime cannot decode may only be answered
``INVALID_ARGUMENT`` (or ``RESOURCE_EXHAUSTED`` for a size limit); an upload stream
holding an undecodable message may be refused with any refusal above, never accepted.
"""
from __future__ import annotations

import collections
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from fednode import client as _client
from fednode.client import FederationClient, channel_options
from orchestrator.coordinator import Coordinator
from orchestrator.scenario import from_dict
from orchestrator.servicer import serve
from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc

TOKEN = "fuzz-federation-token"
PROTOCOL = int(getattr(_client, "PROTOCOL_VERSION", 1))
"""The protocol version an honest node speaks (what the real client sends at Join)."""
SERVICE = "/byzfed.v1.Federation/"
UNARY_TIMEOUT = 5.0
"""Client deadline of every unary call and of every non-waiting ``GetTask``: a hang past it fails."""
PUSH_TIMEOUT = 15.0
"""Client deadline of every upload (a batch runs up to 64 at once on two cores)."""
WAIT_SLACK = 3.0
"""How much longer than its (capped) ``wait_seconds`` a long-poll may take."""
ANCHOR_SAMPLES = 10
FUZZ_SAMPLES = 5

C = grpc.StatusCode
ALLOWED: dict[str, frozenset[grpc.StatusCode]] = {
    "Join": frozenset({C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.FAILED_PRECONDITION,
                       C.RESOURCE_EXHAUSTED}),
    "Heartbeat": frozenset({C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND, C.FAILED_PRECONDITION,
                            C.RESOURCE_EXHAUSTED}),
    "Leave": frozenset({C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND, C.RESOURCE_EXHAUSTED}),
    "GetTask": frozenset({C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND, C.RESOURCE_EXHAUSTED}),
    "PushUpdate": frozenset({C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.NOT_FOUND,
                             C.FAILED_PRECONDITION, C.ALREADY_EXISTS, C.DATA_LOSS, C.RESOURCE_EXHAUSTED}),
}
UNDECODABLE = frozenset({C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED})
"""What a request the protobuf runtime cannot parse may be answered."""
REQUEST_TYPES = {"Join": pb.JoinRequest, "Heartbeat": pb.HeartbeatRequest, "Leave": pb.LeaveRequest,
                 "GetTask": pb.GetTaskRequest}
# gRPC's own words, never the orchestrator's: the request never reached the servicer's
# checks, the servicer raised, or the refusal's trailer was too large to arrive
TRANSPORT_WORDS = ("Exception deserializing", "Exception iterating", "Exception calling application",
                   "Stream removed", "metadata size exceeds", "Unexpected error")


@dataclass
class Outcome:
    """What one call got back: its status, the refusal's message, the time it took and
    the reply (bytes; for ``GetTask`` the list of streamed messages)."""

    rpc: str
    code: grpc.StatusCode
    details: str
    seconds: float
    timeout: float
    reply: Any = None

    def __str__(self) -> str:
        return f"{self.rpc} -> {self.code.name} {self.details[:300]!r} after {self.seconds:.2f} s"


TALLY: collections.Counter = collections.Counter()
"""(rpc, status name) -> fuzz calls made this session (printed at the end of the run)."""
_TALLY_LOCK = threading.Lock()


def call(rpc: str, fn: Callable[[float], Any], timeout: float) -> Outcome:
    """Run ``fn(timeout)`` (one gRPC call; a streamed reply is read to its end) and classify it."""
    t0 = time.monotonic()
    try:
        reply = fn(timeout)
        if not isinstance(reply, (bytes, pb.JoinReply, pb.HeartbeatReply, pb.LeaveReply, pb.PushUpdateReply)):
            reply = list(reply)
        out = Outcome(rpc, C.OK, "", time.monotonic() - t0, timeout, reply)
    except grpc.RpcError as e:
        code = e.code() if callable(getattr(e, "code", None)) else C.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        out = Outcome(rpc, code, details or "", time.monotonic() - t0, timeout)
    with _TALLY_LOCK:
        TALLY[(rpc, out.code.name)] += 1
    return out


def status_problems(out: Outcome, allowed: Optional[frozenset] = None, what: str = "") -> list[str]:
    """Why ``out`` is not an acceptable answer ([] when it is)."""
    allowed = ALLOWED[out.rpc] if allowed is None else allowed
    where = f" [{what}]" if what else ""
    if out.code == C.DEADLINE_EXCEEDED:
        return [f"hang: {out.rpc} gave no answer within its {out.timeout:.1f} s deadline{where}"]
    if out.code not in allowed:
        return [f"{out}: not an allowed status (allowed: {', '.join(sorted(c.name for c in allowed))}){where}"]
    if out.code != C.OK:
        if not out.details.strip():
            return [f"{out}: a refusal without a message{where}"]
        if any(w in out.details for w in TRANSPORT_WORDS):
            return [f"{out}: gRPC's error, not the orchestrator's refusal{where}"]
    return []


class Raw:
    """The Federation service over raw bytes (identity serializers): byte-level fuzzing."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.join = channel.unary_unary(SERVICE + "Join")
        self.heartbeat = channel.unary_unary(SERVICE + "Heartbeat")
        self.leave = channel.unary_unary(SERVICE + "Leave")
        self.get_task = channel.unary_stream(SERVICE + "GetTask")
        self.push = channel.stream_unary(SERVICE + "PushUpdate")

    def unary(self, rpc: str, request: bytes, timeout: float = UNARY_TIMEOUT) -> Outcome:
        fn = {"Join": self.join, "Heartbeat": self.heartbeat, "Leave": self.leave, "GetTask": self.get_task}[rpc]
        return call(rpc, lambda t: fn(request, timeout=t), timeout)


@dataclass
class Node:
    name: str
    secret: str
    client: FederationClient
    task: Optional[pb.TaskHeader] = None
    """Its task's header in the open round (fetched on first use)."""

    @property
    def node_id(self) -> str:
        return self.client.session.node_id

    @property
    def token(self) -> str:
        return self.client.session.token

    def session(self) -> pb.Session:
        return pb.Session(node_id=self.node_id, session_token=self.token)


@dataclass(frozen=True)
class State:
    """What no refused call may change: the open round's accepted uploads (node ->
    (num_samples, bytes)) and their rows, the global weights and their version."""

    round_id: int
    closed: bool
    uploads: dict
    rows: dict
    weights: bytes
    version: int


@dataclass
class Verdict:
    """The test's own reading of an upload stream: ``valid`` (an honest upload,
    perhaps cut into other chunks: must be accepted), ``invalid`` (breaks a rule of
    the protocol: must be refused) or ``unknown`` (odd but not against a rule this
    test knows, e.g. unknown fields: either, and if accepted its row must be what was sent)."""

    kind: str
    why: str
    payload: bytes = b""
    num_samples: int = 0


# the UpdateHeader fields whose rules Verdict knows; a change to any other makes a stream "unknown"
MODELLED = ("session", "round", "model_version", "layout_hash", "num_samples", "tensor")
_TASK_FIELDS = {f.name: f for f in pb.TaskHeader.DESCRIPTOR.fields}
ECHOED = tuple(f.name for f in pb.UpdateHeader.DESCRIPTOR.fields
               if f.name not in MODELLED and f.name in _TASK_FIELDS and _TASK_FIELDS[f.name].type == f.type
               and _TASK_FIELDS[f.name].is_repeated == f.is_repeated)
"""UpdateHeader fields an upload echoes from its task's header (protocol 2: ``upload_nonce``)."""


class LiveFederation:
    def __init__(self, run_dir: Path, fuzz_nodes: int = 16, spares: int = 4, late: int = 4) -> None:
        self.s = from_dict({
            "name": "fuzz", "seed": 0, "model": {"name": "logreg"}, "data": {"dataset": "digits"},
            "federation": {"lease_seconds": 3600.0, "round_timeout": 3600.0},
            "roles": [{"name": "anchor", "count": 1}, {"name": "fz", "count": fuzz_nodes},
                      {"name": "spare", "count": spares}, {"name": "late", "count": late}],
            "output": {"live": False, "plot": False}})
        self.coord = Coordinator(self.s, run_dir, TOKEN)
        self.d = self.coord.layout.d
        self.max_workers = 2 * self.s.num_nodes + 16  # as orchestrator/runner.py sizes the real server
        self.server, self.port = serve(self.coord, "127.0.0.1", 0, self.max_workers)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address, options=channel_options())
        self.stub = pb_grpc.FederationStub(self.channel)
        self.raw = Raw(self.channel)
        self.pool = ThreadPoolExecutor(max_workers=max(8, fuzz_nodes), thread_name_prefix="fuzz-client")
        self.anchor = self._join("anchor-000")
        self.fuzz = [self._join(f"fz-{i:03d}") for i in range(fuzz_nodes)]
        self.spares = [self._join(f"spare-{i:03d}") for i in range(spares)]
        self.late_names = [f"late-{i:03d}" for i in range(late)]
        self.known: dict[str, tuple[str, str]] = {n.name: (n.secret, n.node_id)
                                                  for n in [self.anchor, *self.fuzz, *self.spares]}
        """name -> (secret, node id) of every node that joined (a fuzzed Join may enrol a late one)."""
        self.anchor_delta = torch.linspace(-0.5, 0.5, self.d, dtype=torch.float32)
        self.round_id = -1
        self.cases = 0
        self.new_round()

    def _join(self, name: str) -> Node:
        client = FederationClient(self.address)
        node = Node(name, f"secret-of-{name}", client)
        client.join(name, node.secret, TOKEN, num_samples=FUZZ_SAMPLES, timeout=UNARY_TIMEOUT)
        return node

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for n in [self.anchor, *self.fuzz, *self.spares]:
            n.client.close()
        self.channel.close()
        self.coord.shutdown.set()
        self.coord.keeper.notify()
        self.server.stop(0.5).wait(5)

    # ----- rounds ---------------------------------------------------------------------
    def new_round(self) -> None:
        """Open a fresh round selecting the anchor and every fuzz node; the anchor takes
        its task and uploads its delta with the real client."""
        rid = self.round_id + 1
        self.coord.round_id = rid
        self.coord.open_round(rid, {self.anchor.node_id, *(n.node_id for n in self.fuzz)}, 3600.0, 1.0)
        self.round_id = rid
        for n in self.fuzz:
            n.task = None
        client = self.anchor.client
        task = client.get_task(wait_seconds=2.0, timeout=UNARY_TIMEOUT)
        assert task.kind == "train" and task.round == rid, f"the anchor got no task for round {rid}: {task}"
        client.heartbeat(received_round=rid, timeout=UNARY_TIMEOUT)
        reply = client.push_update(rid, task.model_version, self.anchor_delta, ANCHOR_SAMPLES, timeout=PUSH_TIMEOUT)
        assert reply.accepted, reply
        st = self.state()
        assert st.rows.get(self.anchor.node_id) == self.anchor_delta.numpy().tobytes()

    def task_of(self, node: Node) -> pb.TaskHeader:
        if node.task is None:
            chunks = list(self.stub.GetTask(pb.GetTaskRequest(session=node.session(), wait_seconds=2.0),
                                            timeout=UNARY_TIMEOUT))
            h = chunks[0].header
            assert h.kind == pb.TaskHeader.TRAIN and h.round == self.round_id, f"{node.name}: no task: {h}"
            node.task = h
        return node.task

    def busy(self) -> list[Node]:
        """Fuzz nodes with a task in the open round (GetTask answers them at once)."""
        return self.fuzz

    def idle(self) -> list[Node]:
        """Joined nodes with nothing to do (GetTask long-polls them)."""
        return [self.anchor, *self.spares]

    def rejoin_spares(self) -> None:
        for n in self.spares:
            n.client.join(n.name, n.secret, TOKEN, num_samples=FUZZ_SAMPLES, timeout=UNARY_TIMEOUT)

    # ----- honest traffic ---------------------------------------------------------------
    def payload_for(self, node: Node) -> bytes:
        g = np.random.default_rng([zlib.crc32(node.name.encode()), self.round_id])
        return g.standard_normal(self.d).astype("<f4").tobytes()

    def valid_header(self, node: Node, payload: bytes, num_samples: int = FUZZ_SAMPLES) -> pb.UpdateHeader:
        """The header an honest node sends for ``payload`` in the open round; fields the
        test does not know (e.g. a per-round upload nonce) are echoed from the node's task
        header when it has a field of that name."""
        t = self.task_of(node)
        h = pb.UpdateHeader(session=node.session(), round=t.round, model_version=t.model_version,
                            layout_hash=self.coord.layout_hash, num_samples=num_samples,
                            tensor=codec.tensor_header(memoryview(payload), (len(payload) // 4,)))
        for name in ECHOED:
            f = pb.UpdateHeader.DESCRIPTOR.fields_by_name[name]
            if f.type == f.TYPE_MESSAGE:
                getattr(h, name).CopyFrom(getattr(t, name))
            elif f.is_repeated:
                getattr(h, name).extend(getattr(t, name))
            else:
                setattr(h, name, getattr(t, name))
        return h

    def valid_stream(self, node: Node, payload: Optional[bytes] = None, chunk_bytes: int = 1024) -> list[bytes]:
        payload = self.payload_for(node) if payload is None else payload
        msgs = [pb.UpdateChunk(header=self.valid_header(node, payload)).SerializeToString()]
        msgs += [pb.UpdateChunk(data=payload[i:i + chunk_bytes]).SerializeToString()
                 for i in range(0, len(payload), chunk_bytes)]
        return msgs

    def honest_check(self) -> list[str]:
        """The server still serves honest clients: the anchor's heartbeat, a spare's
        (idempotent) re-join and heartbeat, through the real client."""
        try:
            self.anchor.client.heartbeat(timeout=UNARY_TIMEOUT)
            sp = self.spares[0]
            sess = sp.client.join(sp.name, sp.secret, TOKEN, num_samples=FUZZ_SAMPLES, timeout=UNARY_TIMEOUT)
            if sess.layout_hash != self.coord.layout_hash:
                return [f"honest re-join got layout hash {sess.layout_hash!r}"]
            sp.client.heartbeat(timeout=UNARY_TIMEOUT)
        except grpc.RpcError as e:
            return [f"an honest client is no longer served: {e.code().name} {e.details()!r}"]
        return []

    # ----- state --------------------------------------------------------------------------
    def state(self) -> State:
        r = self.coord.keeper.current
        uploads = {n: (u.num_samples, u.num_bytes) for n, u in dict(r.uploads).items()}
        rows = {n: self.coord.store.row(n).numpy().tobytes() for n in uploads}
        w = self.coord.model.weights.detach().to("cpu", torch.float32).contiguous()
        return State(r.round_id, r.closed, uploads, rows, w.numpy().tobytes(), int(self.coord.model.version))

    def settle(self, timeout: float = 3.0) -> list[str]:
        """Wait until the open round has no upload in flight (every call was answered, so
        none should be): a stream the server still holds after its answer is a problem."""
        end = time.monotonic() + timeout
        while getattr(self.coord.keeper.current, "in_flight", None):
            if time.monotonic() >= end:
                names = sorted(self.coord.name_of(n) for n in self.coord.keeper.current.in_flight)
                return [f"uploads of {names} still in flight {timeout:.0f} s after every call was answered"]
            time.sleep(0.02)
        return []

    def state_problems(self, before: State, after: State, accepted: Optional[dict[str, Verdict]] = None,
                       labels: Optional[dict[str, str]] = None) -> list[str]:
        """What changed besides the uploads in ``accepted`` (node id -> its verdict);
        ``labels``: node id -> what its case sent, for the messages."""
        accepted = accepted or {}
        labels = labels or {}
        p = []
        if (after.round_id, after.closed) != (before.round_id, before.closed):
            p.append(f"the open round changed: {before.round_id}/closed={before.closed} -> "
                     f"{after.round_id}/closed={after.closed}")
        if after.version != before.version or after.weights != before.weights:
            p.append(f"the global model changed (version {before.version} -> {after.version})")
        if self.anchor.node_id not in after.uploads:
            p.append("the anchor's honest upload is gone from the round")
        elif after.rows[self.anchor.node_id] != self.anchor_delta.numpy().tobytes():
            p.append("the anchor's honest row was overwritten")
        for n, v in before.uploads.items():
            if after.uploads.get(n) != v or after.rows.get(n) != before.rows[n]:
                p.append(f"the accepted upload of {self.coord.name_of(n)} changed")
        for n in set(after.uploads) - set(before.uploads):
            v = accepted.get(n)
            case = f" [{labels[n]}]" if n in labels else ""
            if v is None:
                p.append(f"an upload of {self.coord.name_of(n)} was recorded although its call was refused{case}")
            elif after.rows[n] != v.payload or after.uploads[n][0] != v.num_samples:
                p.append(f"the row of {self.coord.name_of(n)} is not what it sent ({v.why}){case}")
        for n in set(accepted) - set(after.uploads):
            case = f" [{labels[n]}]" if n in labels else ""
            p.append(f"{self.coord.name_of(n)}'s upload was answered OK but is not in the round{case}")
        return p

    # ----- uploads --------------------------------------------------------------------------
    def push(self, messages: Sequence[bytes], timeout: float = PUSH_TIMEOUT) -> Outcome:
        return call("PushUpdate", lambda t: self.raw.push(iter(list(messages)), timeout=t), timeout)

    def judge(self, node: Node, messages: Sequence[bytes]) -> Verdict:
        """This test's own reading of an upload stream (see :class:`Verdict`)."""
        parsed = []
        for i, m in enumerate(messages):
            try:
                parsed.append(pb.UpdateChunk.FromString(m))
            except DecodeError:
                return Verdict("invalid", f"message {i} does not decode")
        if not parsed or parsed[0].WhichOneof("payload") != "header":
            return Verdict("invalid", "no header first")
        if any(c.WhichOneof("payload") != "data" for c in parsed[1:]):
            return Verdict("invalid", "a message after the header is not a data chunk")
        h = parsed[0].header
        t = self.task_of(node)
        data = b"".join(c.data for c in parsed[1:])
        rules = [
            (h.session.node_id == node.node_id and h.session.session_token == node.token, "session"),
            (h.round == t.round, f"round {h.round}"),
            (h.model_version == t.model_version, f"model_version {h.model_version}"),
            (h.layout_hash == self.coord.layout_hash, "layout_hash"),
            (h.num_samples > 0, f"num_samples {h.num_samples}"),
            (h.tensor.dtype == codec.FLOAT32, f"dtype {h.tensor.dtype!r}"),
            (h.tensor.num_bytes == 4 * self.d, f"num_bytes {h.tensor.num_bytes}"),
            (len(data) == 4 * self.d, f"{len(data)} data bytes"),
            (len(data) != h.tensor.num_bytes or codec.crc32(data) == h.tensor.crc32, "crc32"),
            *((getattr(h, name) == getattr(t, name), name) for name in ECHOED),
        ]
        broken = [why for ok, why in rules if not ok]
        if not broken and not np.isfinite(np.frombuffer(data, dtype="<f4")).all():
            broken.append("non-finite values")
        if broken:
            return Verdict("invalid", "bad " + ", ".join(broken))
        v = Verdict("valid", "an honest upload", data, h.num_samples)
        honest = self.valid_header(node, data)
        if h.num_samples != honest.num_samples:
            v.kind, v.why = "unknown", f"num_samples {h.num_samples}"
        elif list(h.tensor.shape) != list(honest.tensor.shape):
            v.kind, v.why = "unknown", f"shape {list(h.tensor.shape)[:4]}"
        elif h.SerializeToString(deterministic=True) != honest.SerializeToString(deterministic=True):
            v.kind, v.why = "unknown", "other header fields or unknown fields"
        elif any(not c.data or c.SerializeToString() != pb.UpdateChunk(data=c.data).SerializeToString()
                 for c in parsed[1:]):
            v.kind, v.why = "unknown", "empty chunks or unknown fields in chunks"
        return v

    def push_batch(self, cases: Sequence[tuple[Node, Sequence[bytes]]], label: Optional[Callable[[int], str]] = None
                   ) -> list[str]:
        """Send every case at once (one per node), then check each status against its
        verdict, the round's state before/after, and that an honest client is still served.
        Ends with a fresh round (and the anchor's honest upload in it)."""
        assert len({n.name for n, _ in cases}) == len(cases), "one case per node per round"
        label = label or (lambda i: cases[i][0].name)
        verdicts = [self.judge(n, m) for n, m in cases]
        before = self.state()
        outs = list(self.pool.map(lambda c: self.push(c[1]), cases))
        problems = self.settle()
        after = self.state()
        self.cases += len(cases)
        accepted: dict[str, Verdict] = {}
        labels: dict[str, str] = {}
        for i, ((node, _), v, out) in enumerate(zip(cases, verdicts, outs)):
            what = f"{label(i)}; verdict {v.kind}: {v.why}"
            labels[node.node_id] = f"{what}; answered {out.code.name} {out.details[:120]!r}"
            if v.why.endswith("does not decode"):
                problems += status_problems(out, ALLOWED["PushUpdate"] - {C.OK}, what)
            else:
                problems += status_problems(out, what=what)
            if out.code == C.OK:
                if v.kind == "invalid":
                    problems.append(f"accepted an invalid upload [{what}]")
                else:
                    accepted[node.node_id] = v
            elif v.kind == "valid" and out.code != C.DEADLINE_EXCEEDED:
                problems.append(f"refused an honest upload: {out} [{what}]")
        problems += self.state_problems(before, after, accepted, labels)
        problems += self.honest_check()
        self.new_round()
        return problems


def summarize(problems: Sequence[str], cases: int, limit: int = 15) -> str:
    """The problems grouped by kind (numbers and the case label blanked), most frequent
    first, each with its count and one full example."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        key = re.sub(r"\d+(\.\d+)?", "#", re.sub(r"\[.*\]$", "", p))[:160]
        groups.setdefault(key, []).append(p)
    ordered = sorted(groups.values(), key=len, reverse=True)
    lines = [f"{len(problems)} problems in {cases} cases, {len(groups)} kinds:"]
    lines += [f"  {len(g)} x {g[0]}" for g in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"  ... and {len(ordered) - limit} more kinds")
    return "\n".join(lines)
