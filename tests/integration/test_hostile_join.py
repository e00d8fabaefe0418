"""Joins a client can get wrong on purpose (real gRPC server and clients on 127.0.0.1).

Observed before: a non-roster name with a wrong federation token got PERMISSION_DENIED
with the roster listed and the name echoed (a 7 MB name came back as a 7.3 MB status;
bursts of them left the orchestrator's RSS 190 MB higher); a name that is not UTF-8 got
``INTERNAL "Exception deserializing request!"``; a holder of the federation token could
claim a roster name that had not joined yet and the real node then exited with status 1
and a traceback.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.launch import node_argv, node_env
from orchestrator.servicer import serve
from proto.byzfed.v1 import federation_pb2 as pb
from tests.integration.harness import scenario

C = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[2]
BIG = "x" * 7_000_000  # a 7 MB name (under gRPC's 8 MiB message cap)


@pytest.fixture
def server(tmp_path):
    s = scenario(roles=[{"name": "honest", "count": 3}])
    coord = Coordinator(s, tmp_path, "tok")
    srv, port = serve(coord, "127.0.0.1", 0, 2 * 3 + 16)
    client = FederationClient(f"127.0.0.1:{port}")
    yield coord, client
    client.close()
    srv.stop(0)


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_a_wrong_federation_token_is_unauthenticated_whatever_the_name(server):
    coord, client = server
    for name in ("intruder", "honest-000", "", BIG):
        e = _refused(lambda: client.join(name, "s", "wrong-token"))
        assert e.code() == C.UNAUTHENTICATED and e.details() == "federation token is wrong", e.details()[:200]
    assert not coord.membership.members()


def test_refusals_of_bad_names_are_short_and_never_list_the_roster(server):
    coord, client = server
    e = _refused(lambda: client.join("intruder-" + "y" * 100, "s", "tok"))  # in no roster, token right
    assert e.code() == C.PERMISSION_DENIED and "'intruder-yyy" in e.details() and len(e.details()) < 200
    assert "honest-001" not in e.details()  # (first and last roster name only, for the operator)
    e = _refused(lambda: client.join("z" * 200, "s", "tok"))  # over the name limit
    assert e.code() == C.INVALID_ARGUMENT and "max_name_chars" in e.details() and len(e.details()) < 200
    e = _refused(lambda: client.join(BIG, "s", "tok"))  # over the Join request limit
    assert e.code() == C.RESOURCE_EXHAUSTED and "max_join_bytes" in e.details() and len(e.details()) < 200
    e = _refused(lambda: client.join("honest-000", "q" * 5000, "tok"))
    assert e.code() == C.INVALID_ARGUMENT and "node_secret" in e.details() and len(e.details()) < 200
    assert not coord.membership.members()


def test_a_name_that_is_not_utf8_is_an_invalid_argument(server):
    coord, client = server
    raw = client.channel.unary_unary("/byzfed.v1.Federation/Join")  # bytes in, bytes out
    good = pb.JoinRequest(credentials=pb.Credentials(node_name="honest-000", node_secret="s", federation_token="tok"),
                          protocol_version=2).SerializeToString()
    e = _refused(lambda: raw(good.replace(b"honest-000", b"honest-\xff\xfe0"), timeout=5))
    assert e.code() == C.INVALID_ARGUMENT and "not UTF-8" in e.details(), (e.code(), e.details())
    for rpc in ("Heartbeat", "Leave", "GetTask"):  # every request type: never gRPC's INTERNAL
        e = _refused(lambda: client.channel.unary_unary(f"/byzfed.v1.Federation/{rpc}")(b"\x0a\x03\xff\xfe\xfd",
                                                                                        timeout=5)
                     if rpc != "GetTask" else list(client.channel.unary_stream(f"/byzfed.v1.Federation/{rpc}")(
                         b"\x0a\x03\xff\xfe\xfd", timeout=5)))
        assert e.code() == C.INVALID_ARGUMENT and "malformed" in e.details(), (rpc, e.code(), e.details())
    assert raw(good, timeout=5)  # and the real node still joins


_SERVER = r"""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from orchestrator.coordinator import Coordinator
from orchestrator.servicer import serve
from tests.integration.harness import scenario
coord = Coordinator(scenario(roles=[{"name": "honest", "count": 3}]), Path(tempfile.mkdtemp()), "tok")
server, port = serve(coord, "127.0.0.1", 0, 22)
print(port, flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop(0)
"""


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_bursts_of_huge_joins_leave_the_orchestrators_memory_where_it_was(tmp_path):
    """The orchestrator in its own process; 60 joins with 7 MB names in three bursts, half of
    them with a wrong token. The client accepts statuses of any size (so an echo would
    arrive whole)."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=str(ROOT))
    channel = None
    try:
        port = int(proc.stdout.readline())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_metadata_size", 64 << 20)])
        join = channel.unary_unary("/byzfed.v1.Federation/Join", request_serializer=pb.JoinRequest.SerializeToString,
                                   response_deserializer=pb.JoinReply.FromString)

        def huge(name: str, token: str) -> grpc.RpcError:
            return _refused(lambda: join(pb.JoinRequest(credentials=pb.Credentials(
                node_name=name, node_secret="s", federation_token=token), protocol_version=2), timeout=30))

        join(pb.JoinRequest(credentials=pb.Credentials(node_name="honest-000", node_secret="s", federation_token="tok"),
                            protocol_version=2), timeout=10)
        for _ in range(3):  # warm the server's paths up
            huge("warm-" + BIG, "wrong")
        time.sleep(0.5)
        before = _rss_mb(proc.pid)
        codes, sizes = set(), []
        for burst in range(3):
            for i in range(10):
                for token in ("wrong", "tok"):
                    e = huge(f"{burst}-{i}-" + BIG, token)
                    codes.add((token, e.code()))
                    sizes.append(len(e.details()))
            time.sleep(0.3)
        time.sleep(3.0)  # (the orchestrator trims its heap at most every 2 s after a flood of refused bytes)
        grown = _rss_mb(proc.pid) - before
        assert codes == {("wrong", C.UNAUTHENTICATED), ("tok", C.RESOURCE_EXHAUSTED)}, codes
        assert max(sizes) < 200, max(sizes)
        assert grown < 25, f"RSS grew by {grown:.0f} MB after 60 joins with 7 MB names"
    finally:
        if channel is not None:
            channel.close()
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_a_node_whose_name_was_claimed_first_reports_it_and_exits_with_its_own_status(tmp_path, caplog):
    s = scenario(roles=[{"name": "honest", "count": 2}])
    coord = Coordinator(s, tmp_path, "tok")
    srv, port = serve(coord, "127.0.0.1", 0, 20)
    address = f"127.0.0.1:{port}"
    squatter = FederationClient(address)
    log_path = tmp_path / "honest-001.log"
    proc = None
    try:
        squatter.join("honest-001", "someone-elses-secret", "tok")  # another holder of the token, first
        caplog.set_level(logging.WARNING, logger="orchestrator.membership")
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(node_argv(address, "honest-001", dict(s.node_roles())["honest-001"], s),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT),
                                    env={**os.environ, **node_env("tok")})
        rc = proc.wait(120)
        log = log_path.read_text()
        assert rc == 3, (rc, log[-2000:])
        lines = [ln for ln in log.splitlines() if "is taken by another holder of the federation token" in ln]
        assert len(lines) == 1 and "Traceback" not in log, log[-2000:]
        assert coord.membership.name_conflicts == {"honest-001": 1}
        warnings = [r.getMessage() for r in caplog.records if r.name == "orchestrator.membership"]
        assert any("'honest-001'" in w and "with other credentials was refused" in w for w in warnings), warnings
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        squatter.close()
        srv.stop(0)
