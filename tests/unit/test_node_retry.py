"""The node's retries against a real gRPC server on 127.0.0.1 that fails on purpose.

A small fake orchestrator (a real ``grpc.server`` with a scripted Federation
servicer) answers UNAVAILABLE (or a refusal) as often as a test says; the node
under test is the real ``fednode.node.Node`` with its real client. Checked:
capped exponential back-off with jitter, one log line per round (uploads) or per
outage (join, task polls) instead of one per attempt, giving up at the round's
deadline, no retry of refusals, and one attempt per round in the main loop.
"""
from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import deque
from concurrent import futures

import grpc
import pytest
import torch

from fednode.client import Task, resolve_address
from fednode.node import UPLOAD_GRACE_SECONDS, Backoff, Node, NodeConfig
from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc
from proto.layout import Layout

U = grpc.StatusCode.UNAVAILABLE
LAYOUT = Layout.from_shapes([("w", (8,)), ("b", (4,))])
BASE, CAP = 0.05, 0.4  # the tests' back-off: 50 ms doubling up to 400 ms
SLACK = 0.25  # scheduling and RPC time on a busy 2-core machine


class FakeOrchestrator(pb_grpc.FederationServicer):
    """Answers each method with the next scripted failure (``fail[method]``), or forever
    with ``always[method]``, else like a healthy orchestrator. Records call times."""

    def __init__(self) -> None:
        self.fail: dict[str, deque] = {m: deque() for m in ("Join", "GetTask", "PushUpdate")}
        self.always: dict[str, grpc.StatusCode] = {}
        self.calls: dict[str, list[float]] = {m: [] for m in ("Join", "GetTask", "PushUpdate")}
        self.ingest_address = ""
        self.train_until = 0.0  # GetTask hands out round 0's TRAIN task until then (unix time)
        self.train_deadline = 0.0
        self._lock = threading.Lock()

    def _gate(self, method: str, context) -> None:
        with self._lock:
            self.calls[method].append(time.monotonic())
            code = self.always.get(method) or (self.fail[method].popleft() if self.fail[method] else None)
        if code is not None:
            context.abort(code, f"scripted {code.name}")

    def Join(self, request, context):
        self._gate("Join", context)
        return pb.JoinReply(node_id="n0000-test", session_token="tok", lease_seconds=60.0,
                            layout_json=LAYOUT.to_json(), layout_hash=LAYOUT.hash(), workload_json="{}",
                            ingest_address=self.ingest_address, current_round=0)

    def Heartbeat(self, request, context):
        return pb.HeartbeatReply(lease_seconds=60.0, current_round=0)

    def Leave(self, request, context):
        return pb.LeaveReply()

    def GetTask(self, request, context):
        self._gate("GetTask", context)
        if time.time() < self.train_until:
            buf = codec.tensor_bytes(torch.zeros(LAYOUT.d))
            yield pb.TaskChunk(header=pb.TaskHeader(
                kind=pb.TaskHeader.TRAIN, round=0, model_version=0, deadline_unix=self.train_deadline,
                train_json='{"seed": 0, "round": 0}', layout_hash=LAYOUT.hash(),
                weights=codec.tensor_header(buf, (LAYOUT.d,))))
            for chunk in codec.iter_chunks(buf):
                yield pb.TaskChunk(data=chunk)
        elif self.train_until:
            yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.SHUTDOWN))
        else:
            yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.WAIT, round=0))

    def PushUpdate(self, request_iterator, context):
        self._gate("PushUpdate", context)
        n = sum(len(m.data) for m in request_iterator if m.WhichOneof("payload") == "data")
        return pb.PushUpdateReply(accepted=True, round=0, bytes_received=n, message="stored")


@pytest.fixture
def orch():
    fake = FakeOrchestrator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FederationServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture
def node_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="fednode")
    return caplog


def make_node(address: str, seed: int = 7, **cfg) -> Node:
    node = Node(NodeConfig(address=address, name="honest-000", federation_token="fed", min_backoff=BASE,
                           max_backoff=CAP, **cfg))
    node.rng = random.Random(seed)
    return node


def joined(address: str, **cfg) -> Node:
    node = make_node(address, **cfg)
    node.client.join(node.cfg.name, node.cfg.secret, node.cfg.federation_token)
    return node


def task(round_id: int, seconds: float) -> Task:
    return Task("train", round_id, 0, time.time() + seconds, {}, None)


def lines(caplog, text: str, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def expected_waits(seed: int, n: int) -> list[float]:
    b = Backoff(BASE, CAP, random.Random(seed))
    return [b.next() for _ in range(n)]


# --------------------------------------------------------------------------- the back-off itself

def test_backoff_doubles_up_to_the_cap_with_jitter():
    b = Backoff(0.2, 5.0, random.Random(1))
    assert [b.ceiling(n) for n in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    waits = [b.next() for _ in range(200)]
    for n, w in enumerate(waits):
        assert b.ceiling(n) / 2 <= w <= b.ceiling(n)
    assert len({round(w, 6) for w in waits[10:]}) > 150  # jittered, not the same 5.0 every time
    other = Backoff(0.2, 5.0, random.Random(2))
    assert [other.next() for _ in range(5)] != waits[:5]  # two nodes do not retry in lockstep


# --------------------------------------------------------------------------- uploads

def test_upload_retries_unavailable_with_capped_backoff_and_logs_once(orch, node_logs):
    fake, address = orch
    fake.fail["PushUpdate"].extend([U] * 6)
    node = joined(address)
    assert node.upload(task(3, 30.0), torch.zeros(LAYOUT.d), 10)
    times = fake.calls["PushUpdate"]
    assert len(times) == 7  # 6 failures, then stored
    for got, want in zip(gaps(times), expected_waits(7, 6)):
        assert want - 0.01 <= got <= want + SLACK, (gaps(times), expected_waits(7, 6))
    assert max(gaps(times)) <= CAP + SLACK and gaps(times)[-1] >= CAP / 2 - 0.01  # capped, still backing off
    assert node.rounds_done == 1 and node.attempted == (3, 0, 0)
    # one warning for the round (not one per attempt), one line with the outcome
    assert len(lines(node_logs, "", logging.WARNING)) == 1
    assert "round 3: upload failed" in lines(node_logs, "", logging.WARNING)[0]
    assert "UNAVAILABLE" in lines(node_logs, "", logging.WARNING)[0]
    assert lines(node_logs, "round 3") == [lines(node_logs, "", logging.WARNING)[0],
                                           lines(node_logs, "update sent (attempt 7")[0]]


def test_upload_gives_up_at_the_rounds_deadline(orch, node_logs):
    fake, address = orch
    fake.always["PushUpdate"] = U
    node = joined(address)
    t = task(4, 1.5)
    t0 = time.time()
    assert not node.upload(t, torch.zeros(LAYOUT.d), 10)
    done = time.time()
    assert t.deadline_unix - CAP - 0.05 <= done <= t.deadline_unix + SLACK, (done - t0)
    attempts = len(fake.calls["PushUpdate"])
    assert 4 <= attempts <= 12, attempts  # backed off: ~50, 100, 200, 400, 400 ... ms apart
    assert node.rounds_done == 0 and node.attempted == (4, 0, 0)  # the main loop will not redo round 4
    round_lines = lines(node_logs, "round 4")
    assert len(round_lines) == 2, round_lines  # however many attempts
    assert "upload failed" in round_lines[0]
    assert f"giving up the upload to {address} at the round's deadline" in round_lines[1]
    assert f"after {attempts} attempts" in round_lines[1]


@pytest.fixture
def dead_port(request):
    """A port on 127.0.0.1 where nothing answers: ``refused`` (closed: connection refused) or
    ``black-hole`` (a socket that listens and never speaks: the attempt hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if request.param == "refused":
        sock.close()
    else:
        sock.listen(16)
    try:
        yield port
    finally:
        sock.close()


@pytest.mark.parametrize("dead_port", ["refused", "black-hole"], indirect=True)
def test_upload_to_an_unreachable_ingest_address_gives_up_at_the_deadline(orch, node_logs, dead_port, request):
    """Real network failures (the advertised ingest port does not answer), not scripted ones:
    retried while the round lasts, a hung attempt cut at the deadline (+ a 1 s grace)."""
    fake, address = orch
    fake.ingest_address = f"127.0.0.1:{dead_port}"
    node = joined(address)
    assert node.client.upload_address == f"127.0.0.1:{dead_port}"
    t = task(5, 1.5)
    assert not node.upload(t, torch.zeros(LAYOUT.d), 10)
    assert time.time() <= t.deadline_unix + UPLOAD_GRACE_SECONDS + SLACK
    assert fake.calls["PushUpdate"] == []  # never reached the orchestrator's own port
    round_lines = lines(node_logs, "round 5")
    # refused: "upload failed ... retrying" then "giving up"; black hole: the one attempt hangs
    # until the deadline, so only "giving up"
    assert len(round_lines) == (2 if request.node.callspec.id == "refused" else 1), round_lines
    assert all(f"127.0.0.1:{dead_port}" in line for line in round_lines), round_lines
    assert "at the round's deadline" in round_lines[-1]


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS])
def test_refusals_are_not_retried(orch, node_logs, code):
    fake, address = orch
    fake.always["PushUpdate"] = code
    node = joined(address)
    assert not node.upload(task(2, 30.0), torch.zeros(LAYOUT.d), 10)
    assert len(fake.calls["PushUpdate"]) == 1
    assert node.attempted == (2, 0, 0) and not node._need_rejoin.is_set()
    assert lines(node_logs, "round 2") == [f"honest-000: round 2 update refused: {code.name} scripted {code.name}"]


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED])
def test_a_lost_session_is_not_retried_but_rejoined(orch, code):
    fake, address = orch
    fake.always["PushUpdate"] = code
    node = joined(address)
    assert not node.upload(task(2, 30.0), torch.zeros(LAYOUT.d), 10)
    assert len(fake.calls["PushUpdate"]) == 1
    assert node._need_rejoin.is_set() and node.attempted == (-1, -1, -1)  # re-joins, then may take round 2 again


def test_cancelled_is_retried_unless_the_node_itself_is_stopping(orch):
    fake, address = orch
    fake.fail["PushUpdate"].extend([grpc.StatusCode.CANCELLED] * 2)
    node = joined(address)
    assert node.upload(task(1, 30.0), torch.zeros(LAYOUT.d), 10)
    assert len(fake.calls["PushUpdate"]) == 3
    fake.always["PushUpdate"] = grpc.StatusCode.CANCELLED
    node.stop.set()  # shutting down: a cancelled call is this node's own doing
    assert not node.upload(task(2, 30.0), torch.zeros(LAYOUT.d), 10)
    assert len(fake.calls["PushUpdate"]) == 4


# --------------------------------------------------------------------------- join and task polls

def test_get_task_outage_logs_once_and_backs_off(orch, node_logs):
    fake, address = orch
    node = joined(address)
    fake.fail["GetTask"].extend([U] * 5)
    got = node._retry("get task", lambda: node.client.get_task(wait_seconds=0.1))
    assert got.kind == "wait"
    times = fake.calls["GetTask"]
    assert len(times) == 6
    for g, want in zip(gaps(times), expected_waits(7, 5)):
        assert want - 0.01 <= g <= want + SLACK
    outage = lines(node_logs, "get task")
    assert len(outage) == 2, outage
    assert "orchestrator unreachable (UNAVAILABLE" in outage[0]
    assert "reachable again" in outage[1] and "5 failed attempts" in outage[1]


def test_join_gives_up_after_give_up_after_with_two_log_lines(orch, node_logs):
    fake, address = orch
    fake.always["Join"] = U
    node = make_node(address, give_up_after=0.8)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        node.join()
    took = time.monotonic() - t0
    assert err.value.code() == U
    assert 0.8 <= took <= 0.8 + CAP + SLACK, took
    attempts = len(fake.calls["Join"])
    assert attempts >= 4
    assert len(lines(node_logs, "join:")) == 2  # outage starts, outage gives up
    assert f"({attempts} attempts" in lines(node_logs, "join:", logging.ERROR)[0]


# --------------------------------------------------------------------------- the ingest address

@pytest.mark.parametrize("advertised, dialled", [
    ("", "ORCH"),  # wildcard bind, no advertise_host: the channel the node joined on
    ("0.0.0.0:PORT", "127.0.0.1:PORT"),  # an orchestrator that advertises its bind address: never dial 0.0.0.0
    ("127.0.0.1:PORT", "127.0.0.1:PORT"),
])
def test_uploads_go_where_the_join_reply_says_never_to_a_wildcard(orch, advertised, dialled):
    fake, address = orch
    port = address.rsplit(":", 1)[1]
    fake.ingest_address = advertised.replace("PORT", port)
    node = joined(address)
    assert node.client.upload_address == dialled.replace("ORCH", address).replace("PORT", port)
    assert node.upload(task(0, 30.0), torch.zeros(LAYOUT.d), 10)
    assert len(fake.calls["PushUpdate"]) == 1


def test_resolve_address():
    assert resolve_address("", "10.0.0.1:50051") == "10.0.0.1:50051"
    assert resolve_address(":4242", "10.0.0.1:50051") == "10.0.0.1:4242"
    assert resolve_address("0.0.0.0:4242", "orch.lan:50051") == "orch.lan:4242"
    assert resolve_address("[::]:4242", "[fd00::1]:50051") == "[fd00::1]:4242"
    assert resolve_address("10.0.0.9:4242", "10.0.0.1:50051") == "10.0.0.9:4242"


# --------------------------------------------------------------------------- the main loop

def test_a_failed_round_is_not_trained_again(orch, node_logs):
    """The old tight loop: upload fails, the open round offers the task again, the node
    retrains and fails again, ~25 warnings a second. Now: one attempt per round."""
    fake, address = orch
    fake.always["PushUpdate"] = U
    fake.train_deadline = time.time() + 1.0
    fake.train_until = fake.train_deadline + 1.0  # the round stays open (offering its task) a while longer
    node = make_node(address, idle="light")  # (warm would set this test process's torch threads)
    rounds = []

    def do_round(t):
        rounds.append(t.round)
        node.upload(t, torch.zeros(LAYOUT.d), 10)

    node._do_round = do_round
    t0 = time.monotonic()
    assert node.run() == 0  # SHUTDOWN after train_until
    assert time.monotonic() - t0 < 10
    assert rounds == [0]  # trained once, although the task was offered again and again
    assert len(fake.calls["GetTask"]) >= 2
    assert 3 <= len(fake.calls["PushUpdate"]) <= 12
    assert len(lines(node_logs, "round 0", logging.WARNING)) == 2
