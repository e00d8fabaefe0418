"""Session tokens that expire and rotate, and enrolled node names, over real gRPC on
127.0.0.1 (the orchestrator's server in this process; node processes for the run)."""
from __future__ import annotations

import grpc
import pytest

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.enrolment import enrolment_for
from orchestrator.identity import SessionKeys
from orchestrator.launch import node_argv, node_env
from orchestrator.servicer import serve
from proto.byzfed.v1 import federation_pb2 as pb
from tests.integration.harness import Federation, scenario

C = grpc.StatusCode


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server(tmp_path):
    """A leader whose token clock the test moves: epochs of 10 s, starting at epoch 100."""
    clock = Clock(1000.0)
    s = scenario(roles=[{"name": "honest", "count": 2}], security={"token_seconds": 10.0, "enrol": True})
    coord = Coordinator(s, tmp_path, "tok", keys=SessionKeys(clock=clock))
    srv, port = serve(coord, "127.0.0.1", 0, 20)
    clients = [FederationClient(f"127.0.0.1:{port}") for _ in range(3)]
    yield coord, clock, clients, enrolment_for(s, tmp_path)
    for c in clients:
        c.close()
    srv.stop(0)


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def _heartbeat(client: FederationClient, node_id: str, token: str) -> pb.HeartbeatReply:
    return client.stub.Heartbeat(pb.HeartbeatRequest(session=pb.Session(node_id=node_id, session_token=token)),
                                 timeout=5)


def test_tokens_rotate_on_heartbeats_keep_one_epoch_of_slack_then_expire(server):
    coord, clock, (a, b, _), enrol = server
    sa = a.join("honest-000", enrol.secret("honest-000"), "tok")
    sb = b.join("honest-001", enrol.secret("honest-001"), "tok")
    old = sa.token
    assert old.startswith("100.") and not a.heartbeat().session_token  # same epoch: nothing new
    # one node's token never acts as another: neither to heartbeat nor to poll for a task
    e = _refused(lambda: _heartbeat(b, sb.node_id, old))
    assert e.code() == C.UNAUTHENTICATED and e.details() == "session token does not belong to this node id"
    b.session.token = old
    e = _refused(lambda: b.get_task(wait_seconds=0.1))
    assert e.code() == C.UNAUTHENTICATED and "does not belong" in e.details()
    clock.t = 1010.0  # the epoch turns: the next heartbeat hands a fresh token and the client takes it
    reply = a.heartbeat()
    assert reply.session_token.startswith("101.") and a.session.token == reply.session_token != old
    assert _heartbeat(a, sa.node_id, old).session_token == a.session.token  # the old one still works (slack)...
    assert a.get_task(wait_seconds=0.1).kind == "wait"  # ...and so does the new one
    clock.t = 1020.0  # two epochs on: the old token is expired, with a precise message
    for call in (lambda: _heartbeat(a, sa.node_id, old),
                 lambda: a.stub.Leave(pb.LeaveRequest(session=pb.Session(node_id=sa.node_id, session_token=old)),
                                      timeout=5)):
        e = _refused(call)
        assert e.code() == C.UNAUTHENTICATED, e.details()
        assert e.details().startswith("session token expired: issued in epoch 100, now epoch 102") and \
            "re-join" in e.details() and old.split(".")[1] not in e.details()
    assert a.heartbeat().session_token.startswith("102.")  # the rotated one still renews


def test_a_node_partitioned_past_its_token_rejoins_with_its_secret(server):
    coord, clock, (a, _, _), enrol = server
    s = a.join("honest-000", enrol.secret("honest-000"), "tok")
    clock.t = 1035.0
    e = _refused(lambda: a.heartbeat())
    assert e.code() == C.UNAUTHENTICATED and "session token expired" in e.details()
    again = a.join("honest-000", enrol.secret("honest-000"), "tok")
    assert again.rejoined and again.node_id == s.node_id and again.token.startswith("103.")
    assert not a.heartbeat().session_token


def test_with_enrol_a_squatter_holding_the_federation_token_takes_no_name(server):
    coord, _, (node, squatter, _), enrol = server
    for secret in ("guess", enrol.secret("honest-001")):  # before the real node joined: no squatting
        e = _refused(lambda: squatter.join("honest-000", secret, "tok"))
        assert e.code() == C.UNAUTHENTICATED and "is enrolled (security.enrol)" in e.details()
        assert secret not in e.details()
        assert ("byzfed-refusal", "not-enrolled") in tuple(e.trailing_metadata())
    assert not coord.membership.members()
    s = node.join("honest-000", enrol.secret("honest-000"), "tok")
    assert not s.rejoined
    e = _refused(lambda: squatter.join("honest-000", "guess", "tok"))  # nor a take-over after it
    assert e.code() == C.UNAUTHENTICATED and "is enrolled" in e.details()
    e = _refused(lambda: squatter.join("honest-000", enrol.secret("honest-000"), "wrong"))
    assert e.details() == "federation token is wrong"  # the secret alone is not enough either
    assert [m.name for m in coord.membership.members()] == ["honest-000"]


def test_an_enrolled_federation_completes_every_round_while_tokens_rotate(run_dir):
    # rounds of >= 1.2 s (a straggling role) and tokens of 3 s epochs: a token of epoch E is
    # refused from epoch E + 2 on, so finishing later than that without a re-join takes the
    # rotated tokens (heartbeats every lease_seconds / 3 = 2 s)
    s = scenario(model={"name": "logreg"}, roles=[{"name": "honest", "count": 3, "train_delay_s": 1.2}],
                 federation={"rounds": 8, "lease_seconds": 6.0, "round_timeout": 30.0},
                 security={"token_seconds": 3.0, "enrol": True})
    joined: list[int] = []
    with Federation(s, run_dir, spawn=[], on_event=lambda kind, info: kind == "joined" and joined.append(
            fed.coord.keys.epoch())) as fed:
        enrol = enrolment_for(s, run_dir)
        for name, role in fed.roles.items():
            env = {**node_env(fed.token), "BYZFED_NODE_SECRET": enrol.secret(name)}
            fed.children.spawn(name, node_argv(fed.address, name, role, s), run_dir / "nodes" / f"{name}.log", env)
        summary = fed.wait(120)
        last_epoch = fed.coord.keys.epoch()
        members = fed.coord.membership.members()
    rows = fed.rows()
    assert [r["outcome"] for r in rows] == ["complete"] * 8 and summary["rounds_completed"] == 8
    assert len(joined) == 3 and last_epoch - max(joined) >= 2, (joined, last_epoch)  # past every join token
    assert not [info for kind, info in fed.events if kind == "rejoined"], fed.events  # no session was lost
    assert all(int(m.token.split(".")[0]) >= last_epoch - 1 for m in members)
    assert not any((r.get("refused") or {}).get("unauthenticated") for r in rows)
    assert (run_dir / "enrol" / "enrol.key").stat().st_mode & 0o777 == 0o600
