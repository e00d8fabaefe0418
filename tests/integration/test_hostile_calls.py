"""Calls that must not stall the orchestrator (real gRPC server and clients on 127.0.0.1).

Observed on the threaded server before the ``grpc.aio`` one: upload streams that send
nothing took every worker thread (heartbeats timed out, nodes were evicted); one node's
long-polls or unread task streams did the same with a two-node roster; ``wait_seconds =
NaN`` spun a core for the whole call; a header followed by silence held its thread until
the client went away. Every load here is bounded in count and time.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.servicer import Limits, serve
from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc
from proto.layout import Layout
from tests.integration.harness import scenario

C = grpc.StatusCode
SERVICE = "/byzfed.v1.Federation/"


class Edge:
    """A Coordinator (no round driver: tests open rounds) behind the real server, sized as
    ``orchestrator/runner.py`` sizes it (``2 x nodes + 16`` workers)."""

    def __init__(self, tmp_path: Path, limits: Limits, nodes: int = 2, d: int = 0) -> None:
        s = scenario(roles=[{"name": "n", "count": nodes}], federation={"lease_seconds": 60.0})
        self.coord = Coordinator(s, tmp_path, "tok")
        if d:
            self.coord.use_layout(Layout.from_shapes([("w", (d,))]), torch.zeros(d))
        self.server, self.port = serve(self.coord, "127.0.0.1", 0, 2 * nodes + 16, limits=limits)
        self.address = f"127.0.0.1:{self.port}"
        self.clients: list[FederationClient] = []

    def member(self, name: str) -> FederationClient:
        c = FederationClient(self.address)
        c.join(name, f"secret-{name}", "tok", num_samples=10)
        self.clients.append(c)
        return c

    def open_round(self, r: int, *clients: FederationClient, timeout: float = 60.0):
        self.coord.round_id = r
        return self.coord.open_round(r, {c.session.node_id for c in clients}, timeout, 1.0)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.coord.shutdown.set()
        self.server.stop(0)


@pytest.fixture
def edge(tmp_path):
    made = []

    def make(limits: Limits = Limits(), **kw) -> Edge:
        e = Edge(tmp_path / f"e{len(made)}", limits, **kw)
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()


class AioCalls:
    """Raw calls from a ``grpc.aio`` client on its own event loop thread (many open calls
    cost this process no thread): idle upload streams, long-polls that are never read."""

    def __init__(self, address: str, channels: int = 4) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ends: list[tuple[str, grpc.StatusCode, str, float]] = []
        self.calls: list = []

        async def mk():
            return [grpc.aio.insecure_channel(address, options=[("grpc.channel_id", i)]) for i in range(channels)]
        self.channels = self._do(mk())

    def _do(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def idle_streams(self, n: int) -> None:
        """``n`` PushUpdate streams that send no message at all."""
        async def one(i):
            call = self.channels[i % len(self.channels)].stream_unary(SERVICE + "PushUpdate")()
            self.calls.append(call)
            t0 = time.monotonic()
            try:
                await call
                self.ends.append(("stream", C.OK, "", time.monotonic() - t0))
            except grpc.RpcError as e:
                self.ends.append(("stream", e.code(), e.details() or "", time.monotonic() - t0))

        async def go():
            for i in range(n):
                self.loop.create_task(one(i))
        self._do(go())

    def polls(self, n: int, session: pb.Session, wait: float = 20.0, read_first: bool = True) -> None:
        """``n`` GetTask calls of one node, read only up to their first message."""
        async def one(i):
            m = self.channels[i % len(self.channels)].unary_stream(
                SERVICE + "GetTask", request_serializer=pb.GetTaskRequest.SerializeToString,
                response_deserializer=pb.TaskChunk.FromString)
            call = m(pb.GetTaskRequest(session=session, wait_seconds=wait), timeout=60.0)
            self.calls.append(call)
            t0 = time.monotonic()
            try:
                if read_first:
                    await call.read()
                code = await call.code()
                self.ends.append(("poll", code, await call.details() or "", time.monotonic() - t0))
            except grpc.RpcError as e:
                self.ends.append(("poll", e.code(), e.details() or "", time.monotonic() - t0))

        async def go():
            for i in range(n):
                self.loop.create_task(one(i))
        self._do(go())

    def wait_ends(self, kind: str, n: int, timeout: float) -> list[tuple[grpc.StatusCode, str, float]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = [e[1:] for e in self.ends if e[0] == kind]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return [e[1:] for e in self.ends if e[0] == kind]

    def close(self) -> None:
        if not self.thread.is_alive():
            return

        async def shut():
            for c in self.calls:
                c.cancel()
            for ch in self.channels:
                await ch.close(grace=None)
        try:
            self._do(shut(), 10.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def aio():
    made = []

    def make(address: str) -> AioCalls:
        a = AioCalls(address)
        made.append(a)
        return a
    yield make
    for a in made:
        a.close()


def heartbeat_latencies(client: FederationClient, n: int, period: float = 0.05) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        client.heartbeat(timeout=3.0)
        out.append(time.monotonic() - t0)
        time.sleep(period)
    return out


def upload_round(e: Edge, client: FederationClient, r: int, value: float = 0.01) -> float:
    """Take the round's task and upload a delta; seconds it took."""
    t0 = time.monotonic()
    task = client.get_task(wait_seconds=10.0, timeout=30.0)
    assert task.kind == "train" and task.round == r, task
    reply = client.push_update(task.round, task.model_version, torch.full((e.coord.layout.d,), value), 10, timeout=30.0)
    assert reply.accepted
    return time.monotonic() - t0


# ----- streams without a header ---------------------------------------------------------------

def test_streams_without_a_header_hold_no_thread_and_are_cut_at_the_deadline(edge, aio):
    e = edge(Limits(first_message_seconds=1.5))
    honest = e.member("n-000")
    threads_before = threading.active_count()
    hostile = aio(e.address)
    hostile.idle_streams(200)  # 10x the threaded server's 20 workers
    deadline = time.monotonic() + 10
    while e.server.stats().get("unauthenticated_open", 0) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert e.server.stats()["unauthenticated_open"] == 200
    lat = heartbeat_latencies(honest, 10)
    assert max(lat) < 0.5, lat
    assert threading.active_count() <= threads_before + 2  # (the aio client's loop thread)
    e.open_round(0, honest)
    assert upload_round(e, honest, 0) < 5.0
    ends = hostile.wait_ends("stream", 200, timeout=1.5 + 200 / Limits().cuts_per_second + 10)
    assert len(ends) == 200
    assert {c for c, _, _ in ends} == {C.RESOURCE_EXHAUSTED}
    assert all("first_message_seconds = 1.5 s" in d for _, d, _ in ends)
    assert min(t for _, _, t in ends) >= 1.4
    assert e.server.stats()["unauthenticated_open"] == 0 and e.server.stats()["cut:first_message_seconds"] == 200


def test_over_the_cap_the_oldest_headerless_stream_makes_room_for_an_honest_upload(edge, aio):
    e = edge(Limits(max_unauthenticated_streams=5, first_message_seconds=60.0))
    honest = e.member("n-000")
    hostile = aio(e.address)
    hostile.idle_streams(5)
    end = time.monotonic() + 10
    while e.server.stats().get("unauthenticated_open", 0) < 5 and time.monotonic() < end:
        time.sleep(0.02)
    e.open_round(0, honest)
    upload_round(e, honest, 0)  # its stream evicted the oldest waiting one
    ends = hostile.wait_ends("stream", 1, timeout=10)
    assert len(ends) == 1 and ends[0][0] == C.RESOURCE_EXHAUSTED
    assert "max_unauthenticated_streams = 5" in ends[0][1]
    assert honest.session.node_id in e.coord.keeper.current.uploads


# ----- a header, then silence ---------------------------------------------------------------------

def test_a_header_then_silence_is_cut_and_the_node_may_upload_again(edge):
    e = edge(Limits(idle_seconds=1.0))
    c = e.member("n-000")
    rnd = e.open_round(0, c)
    task = c.get_task(wait_seconds=5.0)
    buf = codec.tensor_bytes(torch.zeros(e.coord.layout.d))
    header = c.update_header(task.round, task.model_version, buf, 10)
    release = threading.Event()

    def silent():
        yield bytes(buf[:1024])
        release.wait(8.0)  # (bounded) the client stays alive but sends nothing more

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        c.push_raw(header, silent(), timeout=15.0)
    took = time.monotonic() - t0
    release.set()
    assert info.value.code() == C.RESOURCE_EXHAUSTED and "idle_seconds = 1 s" in info.value.details()
    assert took < 4.0, took
    assert rnd.refused.get("idle") == 1 and c.session.node_id not in rnd.in_flight
    assert c.session.node_id not in rnd.broken  # cut for silence, not broken: it may try again
    c.push_update(task.round, task.model_version, torch.zeros(e.coord.layout.d), 10)
    assert c.session.node_id in rnd.uploads


# ----- numeric fields ---------------------------------------------------------------------------

@pytest.mark.parametrize("wait", [math.nan, math.inf, -1.0, 1e12])
def test_wait_seconds_nan_negative_or_huge_is_refused_at_once(edge, wait):
    e = edge()
    c = e.member("n-000")
    stub = pb_grpc.FederationStub(c.channel)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetTask(pb.GetTaskRequest(session=c._session_pb(), wait_seconds=wait), timeout=5.0))
    assert info.value.code() == C.INVALID_ARGUMENT and "wait_seconds" in info.value.details()
    assert time.monotonic() - t0 < 1.0


def test_negative_rounds_are_invalid_arguments(edge):
    e = edge()
    c = e.member("n-000")
    e.open_round(0, c)
    with pytest.raises(grpc.RpcError) as info:
        c.heartbeat(received_round=-1)
    assert info.value.code() == C.INVALID_ARGUMENT and "received_round" in info.value.details()
    buf = codec.tensor_bytes(torch.zeros(e.coord.layout.d))
    for key, value in (("round", -1), ("model_version", -5)):
        header = c.update_header(0, 0, buf, 10)
        setattr(header, key, value)
        with pytest.raises(grpc.RpcError) as info:
            c.push_raw(header, codec.iter_chunks(buf))
        assert info.value.code() == C.INVALID_ARGUMENT and key in info.value.details(), info.value.details()
    assert e.coord.keeper.current.refused == {"invalid": 2}


# ----- one misbehaving node ------------------------------------------------------------------------

def test_one_nodes_long_polls_do_not_take_the_other_nodes_calls(edge, aio):
    e = edge(Limits(refusal_delay_seconds=0.2))
    bad, good = e.member("n-000"), e.member("n-001")
    hostile = aio(e.address)
    hostile.polls(20, bad._session_pb(), wait=20.0)  # the threaded server had 2 x 2 + 16 = 20 workers
    end = time.monotonic() + 10
    while len(hostile.ends) < 18 and time.monotonic() < end:
        time.sleep(0.05)
    assert e.server.stats()["authenticated_open"] <= Limits().tasks_per_node
    lat = heartbeat_latencies(good, 10)
    assert max(lat) < 0.5, lat
    e.open_round(0, good)
    assert upload_round(e, good, 0) < 5.0
    ends = hostile.wait_ends("poll", 18, timeout=10)
    assert len(ends) >= 18 and all(c == C.RESOURCE_EXHAUSTED and "tasks_per_node = 2" in d for c, d, _ in ends)


def test_task_streams_a_node_never_reads_are_cut_and_bounded(edge, aio):
    """A stream the client does not read keeps up to its flow-control window of chunks queued
    (with its status behind them) after the orchestrator cut it: such streams count against
    the node (``unread_per_node``) until the client reads or cancels them."""
    d = 4_000_000  # 16 MB of weights: far more than the transport buffers of a stream nobody reads
    lim = Limits(idle_seconds=1.5, refusal_delay_seconds=0.2)
    e = edge(lim, d=d)
    bad, good = e.member("n-000"), e.member("n-001")
    rnd = e.open_round(0, bad, good)
    hostile = aio(e.address)
    hostile.polls(20, bad._session_pb(), wait=5.0, read_first=True)  # TRAIN header read, weights never
    time.sleep(0.5)
    lat = heartbeat_latencies(good, 10)
    assert max(lat) < 0.5, lat
    assert upload_round(e, good, 0) < 10.0
    end = time.monotonic() + 10
    while e.server.stats()["authenticated_open"] and time.monotonic() < end:
        time.sleep(0.05)
    st = e.server.stats()
    assert st["authenticated_open"] == 0 and st.get("cut:idle_seconds", 0) >= 1, st
    assert 1 <= st["draining"] <= lim.unread_per_node + lim.tasks_per_node, st
    ends = hostile.wait_ends("poll", 14, timeout=10)  # the refused ones (the cut ones' status waits behind their data)
    assert len(ends) >= 14 and all(c == C.RESOURCE_EXHAUSTED and "_per_node = " in d for c, d, _ in ends), ends
    assert good.session.node_id in rnd.uploads
    hostile.close()  # the client cancels its streams: they stop counting
    end = time.monotonic() + 10
    while e.server.stats()["draining"] and time.monotonic() < end:
        time.sleep(0.05)
    assert e.server.stats()["draining"] == 0
