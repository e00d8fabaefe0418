"""Calls that stay open cannot stall the federation.

Many calls are held open at once (more than a thread-per-call server has threads:
``2 x nodes + 16`` as ``orchestrator/runner.py`` sizes it): upload streams that never
send their first message, uploads that stall after their header, many long-polls of
one node. While they are open, honest clients must be served within their usual
deadlines: a heartbeat, a re-join, a task download and a whole honest upload. Then
the open calls are released; each must end with an allowed status, and the round and
the model must be as they were (plus the one honest upload).
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from proto.byzfed.v1 import federation_pb2 as pb

from .live import ALLOWED, UNARY_TIMEOUT, LiveFederation, Outcome, call, status_problems

C = grpc.StatusCode
FUZZ_NODES = 8
HOLD = 30.0
"""Longest a held call's client waits (its deadline); the test releases them long before."""


class Held:
    """Calls held open: futures of PushUpdate streams fed by a generator that waits for
    ``release`` (each after sending ``prefix``), and GetTask long-polls."""

    def __init__(self, fed: LiveFederation) -> None:
        self.fed = fed
        self.release = threading.Event()
        self.calls: list[tuple[str, str, grpc.Future]] = []  # (rpc, what, future)

    def _stream(self, prefix: list[bytes]):
        yield from prefix
        self.release.wait(HOLD)

    def upload(self, prefix: list[bytes], what: str) -> None:
        self.calls.append(("PushUpdate", what, self.fed.raw.push.future(self._stream(prefix), timeout=HOLD)))

    def long_poll(self, node, what: str) -> None:
        req = pb.GetTaskRequest(session=node.session(), wait_seconds=20.0).SerializeToString()
        it = self.fed.raw.get_task(req, timeout=HOLD)
        self.calls.append(("GetTask", what, it))

    def finish(self) -> list[str]:
        """Release the streams, cancel the long-polls; every status must be allowed
        (CANCELLED only where this test cancelled the call itself)."""
        self.release.set()
        problems = []
        for rpc, what, f in self.calls:
            if rpc == "GetTask" and not f.done():
                f.cancel()
        end = time.monotonic() + 10.0
        for rpc, what, f in self.calls:
            while not f.done() and time.monotonic() < end:
                time.sleep(0.01)
            if not f.done():
                problems.append(f"{what}: still open 10 s after it was released")
                f.cancel()
                continue
            code = f.code()
            if code == C.CANCELLED and rpc == "GetTask":
                continue  # cancelled by this test
            out = Outcome(rpc, code, f.details() or "", 0.0, HOLD)
            allowed = ALLOWED[rpc] - ({C.OK} if rpc == "PushUpdate" else set())
            problems += status_problems(out, allowed, what)
        return problems


def honest_traffic(fed: LiveFederation, node) -> tuple[list[str], Outcome]:
    """What honest nodes do, each call within its usual deadline: heartbeats, a re-join,
    a task download and a whole upload of ``node`` (a selected node)."""
    problems = fed.honest_check()
    task = call("GetTask", lambda t: fed.stub.GetTask(pb.GetTaskRequest(session=node.session(), wait_seconds=1.0),
                                                      timeout=t), UNARY_TIMEOUT)
    if task.code != C.OK:
        problems.append(f"an honest task download while calls are held open: {task}")
    out = fed.push(fed.valid_stream(node), timeout=UNARY_TIMEOUT)
    if out.code != C.OK:
        problems.append(f"an honest upload while calls are held open: {out}")
    return problems, out


@pytest.mark.parametrize("kind", ["silent uploads", "uploads stalled after their header", "long-polls of one node",
                                  "all at once"])
def test_open_calls_do_not_stall_honest_clients(fed, kind):
    n = fed.max_workers + 16  # more than a thread-per-call server of this roster has threads
    held = Held(fed)
    honest_node = fed.fuzz[-1]
    for node in fed.fuzz:
        fed.task_of(node)  # (before anything is held open)
    try:
        if kind in ("silent uploads", "all at once"):
            for i in range(n):
                held.upload([], f"silent upload {i}")
        if kind in ("uploads stalled after their header", "all at once"):
            for node in fed.fuzz[:-1]:
                stream = fed.valid_stream(node)
                held.upload(stream[:1], f"{node.name}'s upload stalled after its header")
                held.upload(stream[:2], f"{node.name}'s upload stalled after its first chunk")
        if kind in ("long-polls of one node", "all at once"):
            for i in range(n):
                held.long_poll(fed.spares[2], f"long-poll {i} of {fed.spares[2].name}")
        time.sleep(1.0)  # let them all reach the server
        before = fed.state()
        problems, out = honest_traffic(fed, honest_node)
    finally:
        problems_after = held.finish()
    problems_after += fed.settle()
    after = fed.state()
    accepted = {honest_node.node_id: fed.judge(honest_node, fed.valid_stream(honest_node))} if out.code == C.OK else {}
    problems += problems_after + fed.state_problems(before, after, accepted) + fed.honest_check()
    fed.new_round()
    assert not problems, "\n".join(problems[:40])


def test_abandoned_upload_leaves_the_round_alone(fed):
    """A client that cancels its upload halfway: the server drops the half-received
    upload, keeps everything else, and still serves honest clients."""
    node = fed.fuzz[0]
    stream = fed.valid_stream(node, chunk_bytes=256)
    release = threading.Event()

    def messages():
        yield from stream[:4]
        release.wait(HOLD)

    before = fed.state()
    f = fed.raw.push.future(messages(), timeout=HOLD)
    time.sleep(0.5)
    f.cancel()
    release.set()
    time.sleep(0.2)
    problems = fed.settle() + fed.state_problems(before, fed.state()) + fed.honest_check()
    again = fed.push(stream)
    problems += status_problems(again, what="the same node's upload after it cancelled one")
    if again.code == C.OK:  # (one attempt per round: a refusal is fine; an acceptance must be whole)
        problems += fed.state_problems(before, fed.state(), {node.node_id: fed.judge(node, stream)})
    fed.new_round()
    assert not problems, "\n".join(problems)


@pytest.mark.fuzz_long
@pytest.mark.timeout(300)
def test_server_ends_silent_streams_itself(fed):
    """An upload stream that never sends its header is ended by the server (a limit),
    not held until the client gives up (fuzz_long: waits up to 120 s)."""
    release = threading.Event()

    def silent():
        release.wait(150.0)
        yield from ()

    t0 = time.monotonic()
    f = fed.raw.push.future(silent(), timeout=150.0)
    while not f.done() and time.monotonic() - t0 < 120.0:
        time.sleep(0.1)
    done = f.done()
    release.set()
    assert done, "the server held a stream that sent nothing for 120 s"
    problems = status_problems(Outcome("PushUpdate", f.code(), f.details() or "", time.monotonic() - t0, 150.0),
                               ALLOWED["PushUpdate"] - {C.OK}, "a silent upload stream")
    assert not problems, problems
