"""Fuzzing Join, Heartbeat, Leave and GetTask against the real server on 127.0.0.1.

Structured (hypothesis over every field of each request, kept near real requests so
cases reach past the first check) and byte-level (mutated serializations of real
requests over raw bytes). Every case must get an allowed status (never INTERNAL or
UNKNOWN) before its client deadline, leave the open round and the model as they were,
and an honest client must still be served afterwards (see ``live.py``).
"""
from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, strategies as st

from orchestrator import servicer
from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb

from .live import PROTOCOL, REQUEST_TYPES, TOKEN, UNARY_TIMEOUT, UNDECODABLE, WAIT_SLACK, LiveFederation, call, \
    status_problems, summarize
from .mutate import mutate_bytes, string_paths
from .strategies import get_task_requests, heartbeat_requests, is_live_session, join_requests, leave_requests

C = grpc.StatusCode
FUZZ_NODES = 8
MAX_WAIT = float(getattr(servicer, "MAX_WAIT_SECONDS", 20.0))
"""The longest a GetTask long-poll may wait (the servicer's cap; 20 s if it no longer says)."""


def _fail(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


def _live(fed: LiveFederation) -> list:
    return [fed.anchor, *fed.fuzz, *fed.spares]


# ----- Join ------------------------------------------------------------------------------------
def join_problems(fed: LiveFederation, req: pb.JoinRequest, out) -> list[str]:
    problems = status_problems(out)
    c = req.credentials
    if out.code == C.OK:
        r = pb.JoinReply.FromString(out.reply) if isinstance(out.reply, bytes) else out.reply
        if c.federation_token != TOKEN:
            problems.append(f"joined {c.node_name[:40]!r} with a wrong federation token")
        if c.node_name not in fed.coord.roster:
            problems.append(f"joined {c.node_name[:40]!r}, a name outside the roster")
        known = fed.known.get(c.node_name)
        if known is not None and known[0] != c.node_secret:
            problems.append(f"handed {c.node_name!r}'s identity to a join with another secret")
        if known is not None and r.node_id != known[1]:
            problems.append(f"re-join of {c.node_name!r} got node id {r.node_id!r}, not {known[1]!r}")
        if r.layout_hash != fed.coord.layout_hash or not r.session_token:
            problems.append(f"join reply without the model's layout or a session: {r}")
        if known is None and not problems:
            fed.known[c.node_name] = (c.node_secret, r.node_id)
    elif c.node_name in fed.known and fed.known[c.node_name][0] == c.node_secret and c.federation_token == TOKEN \
            and out.code == C.UNAUTHENTICATED:
        problems.append(f"refused the right credentials of {c.node_name!r}: {out}")
    return problems


def test_join_fields(fed, budget):
    @budget.seeded
    @budget.settings(300)
    @given(data=st.data())
    def prop(data):
        req = data.draw(join_requests(fed), label="JoinRequest")
        before = fed.state()
        out = call("Join", lambda t: fed.stub.Join(req, timeout=t), UNARY_TIMEOUT)
        _fail(join_problems(fed, req, out) + fed.state_problems(before, fed.state()) + fed.honest_check())

    prop()


# ----- Heartbeat, Leave --------------------------------------------------------------------------
def session_problems(fed: LiveFederation, out, session: pb.Session, live: list) -> list[str]:
    problems = status_problems(out)
    valid = is_live_session(fed, session, live)
    if out.code == C.OK and not valid:
        problems.append(f"{out.rpc} answered OK to a session that is not a member's: {session}")
    if valid and out.code in (C.UNAUTHENTICATED, C.NOT_FOUND):
        problems.append(f"{out.rpc} refused a member's own session: {out}")
    return problems


def test_heartbeat_fields(fed, budget):
    @budget.seeded
    @budget.settings(300)
    @given(data=st.data())
    def prop(data):
        req = data.draw(heartbeat_requests(fed), label="HeartbeatRequest")
        before = fed.state()
        out = call("Heartbeat", lambda t: fed.stub.Heartbeat(req, timeout=t), UNARY_TIMEOUT)
        problems = session_problems(fed, out, req.session, _live(fed))
        if out.code == C.OK and out.reply.current_round != fed.round_id:
            problems.append(f"heartbeat reply says round {out.reply.current_round}, the open one is {fed.round_id}")
        _fail(problems + fed.state_problems(before, fed.state()) + fed.honest_check())

    prop()


def test_leave_fields(fed, budget):
    @budget.seeded
    @budget.settings(200)
    @given(data=st.data())
    def prop(data):
        req = data.draw(leave_requests(fed), label="LeaveRequest")
        before = fed.state()
        out = call("Leave", lambda t: fed.stub.Leave(req, timeout=t), UNARY_TIMEOUT)
        problems = session_problems(fed, out, req.session, fed.spares[1:])
        if out.code == C.OK:
            fed.rejoin_spares()
        _fail(problems + fed.state_problems(before, fed.state()) + fed.honest_check())

    prop()


# ----- GetTask -------------------------------------------------------------------------------------
def capped(wait: float) -> float:
    """How long a long-poll for ``wait`` may take before it must have answered."""
    return min(wait, MAX_WAIT) if wait > 0 else 0.0  # NaN and non-positive: no wait


def get_task_problems(fed: LiveFederation, req: pb.GetTaskRequest, kind: str, out) -> list[str]:
    problems = status_problems(out)
    if kind == "invalid" and out.code == C.OK:
        problems.append(f"GetTask served a session that is not a member's: {req.session}")
    if kind != "invalid" and out.code in (C.UNAUTHENTICATED, C.NOT_FOUND):
        problems.append(f"GetTask refused a member's own session: {out}")
    if out.code != C.OK:
        return problems
    chunks = [pb.TaskChunk.FromString(m) if isinstance(m, bytes) else m for m in out.reply]
    if not chunks or chunks[0].WhichOneof("payload") != "header":
        return problems + ["GetTask's stream does not start with a TaskHeader"]
    h = chunks[0].header
    if kind == "busy":
        if h.kind != pb.TaskHeader.TRAIN or h.round != fed.round_id:
            problems.append(f"a selected node got {pb.TaskHeader.Kind.Name(h.kind)} round {h.round}, "
                            f"not its task of round {fed.round_id}")
        else:
            w = codec.decode_array(h.weights, (c.data for c in chunks[1:]), expected_bytes=4 * fed.d)
            if w.tobytes() != fed.coord.model.weights.numpy().tobytes():
                problems.append("the task's weights are not the global model's")
    elif kind == "idle":
        if h.kind != pb.TaskHeader.WAIT or len(chunks) != 1:
            problems.append(f"an idle node got {pb.TaskHeader.Kind.Name(h.kind)} with {len(chunks) - 1} chunks")
        if out.seconds > capped(req.wait_seconds) + WAIT_SLACK:
            problems.append(f"a long-poll for {req.wait_seconds!r} s took {out.seconds:.1f} s")
    return problems


def _get_task(fed: LiveFederation, req: pb.GetTaskRequest, kind: str):
    timeout = UNARY_TIMEOUT + (capped(req.wait_seconds) if kind == "idle" else 0.0)
    return call("GetTask", lambda t: fed.stub.GetTask(req, timeout=t), timeout)


def test_get_task_fields(fed, budget):
    @budget.seeded
    @budget.settings(300)
    @given(data=st.data())
    def prop(data):
        req, kind = data.draw(get_task_requests(fed, long_waits=budget.long), label="(GetTaskRequest, kind)")
        before = fed.state()
        out = _get_task(fed, req, kind)
        _fail(get_task_problems(fed, req, kind, out) + fed.state_problems(before, fed.state()) + fed.honest_check())

    prop()


@pytest.mark.parametrize("wait", [math.nan, -math.nan, -math.inf, -1e308, 0.0, -0.0, 5e-324, 0.2], ids=repr)
def test_get_task_meaningless_waits_answer_at_once(fed, wait):
    """An idle node's long-poll with a NaN, negative or tiny wait answers (WAIT, or a
    refusal) within its client deadline; it must neither spin nor hang."""
    req = pb.GetTaskRequest(session=fed.spares[0].session(), wait_seconds=wait)
    _fail(get_task_problems(fed, req, "idle", _get_task(fed, req, "idle")) + fed.honest_check())


@pytest.mark.fuzz_long
@pytest.mark.timeout(600)
@pytest.mark.parametrize("wait", [math.inf, 1e308, 2.0 ** 63, MAX_WAIT + 5.0], ids=repr)
def test_get_task_long_waits_are_capped(fed, wait):
    """A long-poll asking for more than the cap answers WAIT by the cap (20 s each: fuzz_long only)."""
    req = pb.GetTaskRequest(session=fed.spares[0].session(), wait_seconds=wait)
    _fail(get_task_problems(fed, req, "idle", _get_task(fed, req, "idle")) + fed.honest_check())


# ----- byte-level --------------------------------------------------------------------------------
def _bases(fed: LiveFederation, rpc: str) -> list[bytes]:
    """Real requests to mutate (only the spares' may really leave; GetTask uses nodes with a
    task, so a mutated wait is answered at once)."""
    sp = fed.spares[1]
    if rpc == "Join":
        reqs = [pb.JoinRequest(credentials=pb.Credentials(node_name=sp.name, node_secret=sp.secret,
                                                          federation_token=TOKEN),
                               num_samples=5, device="cpu", cpu_cores=2, protocol_version=PROTOCOL),
                pb.JoinRequest(credentials=pb.Credentials(node_name="late-000", node_secret="s", federation_token="no"),
                               num_samples=5, device="cpu", cpu_cores=2, protocol_version=PROTOCOL)]
    elif rpc == "Heartbeat":
        reqs = [pb.HeartbeatRequest(session=fed.anchor.session(), received_round=fed.round_id),
                pb.HeartbeatRequest(session=fed.fuzz[0].session())]
    elif rpc == "Leave":
        reqs = [pb.LeaveRequest(session=sp.session(), reason="bye")]
    else:
        reqs = [pb.GetTaskRequest(session=n.session(), wait_seconds=0.1) for n in fed.busy()[:2]]
    return [r.SerializeToString() for r in reqs]


@pytest.mark.parametrize("rpc", ["Join", "Heartbeat", "Leave", "GetTask"])
def test_request_bytes(fed, budget, rpc):
    """Mutated serializations of real requests, sent as raw bytes: an undecodable one is
    refused INVALID_ARGUMENT; a decodable one is judged like a structured case."""
    rng = budget.rng(rpc)
    strings = string_paths(REQUEST_TYPES[rpc].DESCRIPTOR)
    bases = _bases(fed, rpc)
    problems: list[str] = []
    planned = budget.cases(400)
    deadline = budget.deadline()
    done = 0
    for i in planned:
        if budget.out_of_time(deadline, i, len(planned)):
            break
        raw, why = rng.choice(bases), []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            raw, w = mutate_bytes(rng, raw, strings)
            why.append(w)
        what = f"{rpc} case {i}: " + "; ".join(why)
        try:
            req = REQUEST_TYPES[rpc].FromString(raw)
        except DecodeError:
            req = None
        before = fed.state()
        kind = "undecodable"
        if req is None:
            out = fed.raw.unary(rpc, raw)
            problems += status_problems(out, UNDECODABLE, what)
        elif rpc == "Join":
            out = fed.raw.unary(rpc, raw)
            problems += [f"{p} [{what}]" for p in join_problems(fed, req, out)]
        elif rpc == "GetTask":
            live = [*fed.busy(), *fed.idle()]
            kind = ("busy" if is_live_session(fed, req.session, fed.busy()) else
                    "idle" if is_live_session(fed, req.session, live) else "invalid")
            timeout = UNARY_TIMEOUT + (capped(req.wait_seconds) if kind == "idle" else 0.0)
            out = fed.raw.unary(rpc, raw, timeout=timeout)
            problems += [f"{p} [{what}]" for p in get_task_problems(fed, req, kind, out)]
        else:
            out = fed.raw.unary(rpc, raw)
            live = fed.spares[1:] if rpc == "Leave" else _live(fed)
            problems += [f"{p} [{what}]" for p in session_problems(fed, out, req.session, live)]
        if rpc == "Leave" and out.code == C.OK:
            fed.rejoin_spares()
        problems += [f"{p} [{what}]" for p in fed.state_problems(before, fed.state())]
        done += 1
        if done % 50 == 0:
            problems += [f"{p} [after {what}]" for p in fed.honest_check()]
    problems += fed.honest_check()
    print(f"{rpc}: {done} byte-level cases")
    assert not problems, summarize(problems, done)
