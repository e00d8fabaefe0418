"""Revocation while a run goes on, over real gRPC on 127.0.0.1: a revoked name's join,
heartbeat, task poll and upload are refused with ``PERMISSION_DENIED``, under mutual TLS
a revoked client certificate is refused whatever name it claims, an aggregation rank
other than the leader refuses a revoked node too, and a 4-node federation (node
processes) goes on without a node revoked mid-run."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.identity import SessionKeys
from orchestrator.revocation import FILE, append, cert_id
from orchestrator.servicer import serve
from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.certs import client_paths
from proto.tls import ClientTls
from tests.integration.harness import Federation, scenario

C = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[2]


def _refused(fn, timeout: float = 5.0) -> grpc.RpcError:
    """The error of ``fn`` once it fails (the servers look at the list at most every second)."""
    end = time.monotonic() + timeout
    while True:
        try:
            fn()
        except grpc.RpcError as e:
            return e
        assert time.monotonic() < end, "the call was not refused in time"
        time.sleep(0.1)


def _trailer(e: grpc.RpcError) -> str:
    return dict(e.trailing_metadata() or ()).get("byzfed-refusal", "")


def _heartbeat(client: FederationClient, node_id: str, token: str) -> pb.HeartbeatReply:
    return client.stub.Heartbeat(pb.HeartbeatRequest(session=pb.Session(node_id=node_id, session_token=token)),
                                 timeout=5)


def _upload(client: FederationClient) -> pb.PushUpdateReply:
    buf = memoryview(b"\0" * (4 * 8))
    header = pb.UpdateHeader(session=client._session_pb(), round=0, model_version=0,
                             layout_hash=client.session.layout_hash, num_samples=1,
                             tensor=codec.tensor_header(buf, (8,)), upload_nonce="x" * 32)
    return client.push_raw(header, [bytes(buf)], timeout=10)


@pytest.fixture
def mtls_server(tmp_path):
    s = scenario(model={"name": "logreg"}, roles=[{"name": "honest", "count": 3}], security={"mtls": True})
    coord = Coordinator(s, tmp_path, "tok")
    srv, port = serve(coord, "127.0.0.1", 0, 8)
    certs = tmp_path / "certs"

    def client(cert_of: str) -> FederationClient:
        pem, key = client_paths(certs, cert_of)
        return FederationClient(f"127.0.0.1:{port}", tls_files=ClientTls(str(certs / "ca.pem"), str(pem), str(key)))

    made: list[FederationClient] = []
    yield coord, tmp_path / FILE, lambda name: made.append(client(name)) or made[-1], certs
    for c in made:
        c.close()
    srv.stop(0)


def test_a_revoked_name_is_refused_on_every_call_and_evicted(mtls_server):
    coord, revoked, client, _ = mtls_server
    a, b = client("honest-000"), client("honest-001")
    sa, sb = a.join("honest-000", "sa", "tok"), b.join("honest-001", "sb", "tok")
    append(revoked, ["name honest-001"])
    e = _refused(lambda: b.heartbeat())
    assert e.code() == C.PERMISSION_DENIED and e.details() == "node 'honest-001' is revoked", e.details()
    assert _trailer(e) == "revoked"
    m = coord.membership.get(sb.node_id)
    assert not m.alive and coord.membership.evict_reasons[sb.node_id] == "revoked"
    for call in (lambda: b.get_task(wait_seconds=0.1), lambda: _upload(b),
                 lambda: b.join("honest-001", "sb", "tok"), lambda: b.join("honest-001", "another", "tok")):
        e = _refused(call, timeout=0)
        assert e.code() == C.PERMISSION_DENIED and e.details() == "node 'honest-001' is revoked", e.details()
    assert a.heartbeat() is not None and a.get_task(wait_seconds=0.1).kind == "wait"  # the others go on
    assert [x.name for x in coord.membership.alive()] == ["honest-000"]
    assert sa.node_id != sb.node_id


def test_a_revoked_client_certificate_is_refused_under_any_name(mtls_server):
    coord, revoked, client, certs = mtls_server
    a, c = client("honest-000"), client("honest-002")
    a.join("honest-000", "sa", "tok")
    sc = c.join("honest-002", "sc", "tok")
    cid = cert_id(client_paths(certs, "honest-002")[0].read_bytes())
    append(revoked, [f"serial {cid.serial}"])  # the certificate only, not the name
    e = _refused(lambda: _heartbeat(c, sc.node_id, sc.token))
    assert e.code() == C.PERMISSION_DENIED and _trailer(e) == "revoked"
    assert e.details().startswith(f"client certificate of 'honest-002' (serial {cid.serial}, sha256 "), e.details()
    assert e.details().endswith("is revoked")
    for name in ("honest-002", "honest-001"):  # whatever name the connection claims, before any other check
        e = _refused(lambda: c.join(name, "sc", "tok"), timeout=0)
        assert e.code() == C.PERMISSION_DENIED and "client certificate of 'honest-002'" in e.details(), e.details()
    e = _refused(lambda: c.get_task(wait_seconds=0.1), timeout=0)
    assert e.code() == C.PERMISSION_DENIED
    # the name itself is not revoked: with a new certificate (not revoked) honest-002 joins again
    from proto.certs import write_bundle
    (certs / "clients" / "honest-002.pem").unlink()
    (certs / "clients" / "honest-002.key").unlink()
    write_bundle(certs, [], ["honest-002"])
    c2 = client("honest-002")
    assert c2.join("honest-002", "sc", "tok").node_id == sc.node_id
    e = _refused(lambda: _heartbeat(a, "n0000-zzzzzz", "1.x"), timeout=0)  # (and the others are untouched)
    assert e.code() == C.UNAUTHENTICATED and a.heartbeat() is not None


def test_an_aggregation_rank_other_than_the_leader_refuses_a_revoked_node(tmp_path):
    """Rank 1's ingest endpoint (its own ``Revocations`` of the same file) refuses a revoked
    node's task polls and uploads, with a session token it verifies from the run's key."""
    s = scenario(model={"name": "logreg"}, roles=[{"name": "honest", "count": 2}])
    keys = SessionKeys()
    coord = Coordinator(s, tmp_path, "tok", keys=keys, rank=1)
    srv, port = serve(coord, "127.0.0.1", 0, 8)
    client = FederationClient(f"127.0.0.1:{port}")
    try:
        node_id = coord.node_id_of_index(1)
        req = pb.GetTaskRequest(session=pb.Session(node_id=node_id, session_token=coord.keys.token(node_id)),
                                wait_seconds=0.1)
        assert list(client.stub.GetTask(req, timeout=5))  # not revoked: answered (a WAIT)
        append(tmp_path / FILE, ["name honest-001"])
        e = _refused(lambda: list(client.stub.GetTask(req, timeout=5)))
        assert e.code() == C.PERMISSION_DENIED and e.details() == "node 'honest-001' is revoked", e.details()
        other = coord.node_id_of_index(0)
        req0 = pb.GetTaskRequest(session=pb.Session(node_id=other, session_token=coord.keys.token(other)),
                                 wait_seconds=0.1)
        assert list(client.stub.GetTask(req0, timeout=5))  # honest-000 is still served
        header = pb.UpdateHeader(session=req.session, round=0, model_version=0, layout_hash=coord.layout_hash,
                                 num_samples=1, tensor=codec.tensor_header(memoryview(b"\0" * 4), (1,)),
                                 upload_nonce="x" * 32)
        e = _refused(lambda: client.stub.PushUpdate(iter([pb.UpdateChunk(header=header)]), timeout=5), timeout=0)
        assert e.code() == C.PERMISSION_DENIED and e.details() == "node 'honest-001' is revoked"
    finally:
        client.close()
        srv.stop(0)


def test_a_node_revoked_mid_run_is_evicted_and_the_others_complete_every_round(run_dir):
    rounds, victim = 6, "honest-003"
    s = scenario(model={"name": "logreg"}, roles=[{"name": "honest", "count": 4, "train_delay_s": 0.3}],
                 federation={"rounds": rounds, "lease_seconds": 6.0, "round_timeout": 90.0})
    t0 = time.monotonic()
    with Federation(s, run_dir) as fed:
        fed.wait_for(lambda: len(fed.rows()) >= 2, timeout=90)
        p = subprocess.run([sys.executable, "-m", "orchestrator", "revoke", str(run_dir), victim], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        revoked_at = len(fed.rows())
        proc = fed.children.snapshot()[victim]
        fed.wait_for(lambda: proc.poll() is not None, timeout=30)  # its session ended: the node stopped
        log_path = run_dir / "nodes" / f"{victim}.log"
        log = log_path.read_text(errors="replace")
        fed.start_node(victim)  # its re-join is refused: the node process started again stops at its join...
        again = fed.children.snapshot()[victim]
        fed.wait_for(lambda: again.poll() is not None, timeout=30)
        rejoin_log = log_path.read_text(errors="replace")[len(log):]
        summary = fed.wait(120)
        # ...and so is a direct join
        client = FederationClient(fed.address)
        try:
            e = _refused(lambda: client.join(victim, "whatever", fed.token), timeout=0)
        finally:
            client.close()
        members = {m.name: m for m in fed.coord.membership.members()}
        reasons = dict(fed.coord.membership.evict_reasons)
    rows = fed.rows()
    took = time.monotonic() - t0
    assert e.code() == C.PERMISSION_DENIED and e.details() == f"node {victim!r} is revoked"
    assert "PERMISSION_DENIED" in log and f"node '{victim}' is revoked" in log, log[-3000:]
    assert again.poll() != 0 and f"node '{victim}' is revoked" in rejoin_log, rejoin_log[-3000:]
    assert "joined as" not in rejoin_log
    assert summary["rounds_completed"] == rounds, [r["outcome"] for r in rows]
    assert [r["outcome"] for r in rows if r["outcome"] not in ("complete", "dead-nodes")] == [], rows
    assert not members[victim].alive and reasons[members[victim].node_id] == "revoked"
    assert [r["evicted_revoked"] for r in rows if "evicted_revoked" in r] == [[victim]], rows
    others = [f"honest-00{i}" for i in range(3)]
    for r in rows:  # the others take part in (and report in) every round
        assert set(others) <= set(r["selected_nodes"]) and r["reported"] >= 3, r
    # evicted within about a second (the list is looked at at most every second): the row of the
    # first round selected after it; from then on never selected, the others report alone
    evicted = next(i for i, r in enumerate(rows) if "evicted_revoked" in r)
    assert revoked_at <= evicted <= revoked_at + 3, (revoked_at, evicted)
    after = rows[evicted:]
    assert after and all(victim not in r["selected_nodes"] and r["reported"] == 3 for r in after), rows
    # a round that selected it before the eviction: its upload counts only if accepted before the revocation
    for r in rows[revoked_at:evicted]:
        assert r["reported"] in (3, 4), r
    assert all(r["reported"] == 4 for r in rows[:2])
    print(f"revoked after round {revoked_at - 1}: {rounds} rounds, {took:.1f}s; outcomes "
          f"{[r['outcome'] for r in rows]}")


def test_an_upload_not_yet_accepted_is_refused_one_accepted_stays(mtls_server):
    """Revoked while its upload streams in: refused at the end of the stream (nothing of
    it enters the round); an upload the round accepted before the revocation stays."""
    coord, revoked, client, _ = mtls_server
    a, b = client("honest-000"), client("honest-001")
    sa, sb = a.join("honest-000", "sa", "tok"), b.join("honest-001", "sb", "tok")
    rnd = coord.open_round(0, {sa.node_id, sb.node_id}, 60.0, 1)
    buf = memoryview(b"\0" * (4 * coord.layout.d))

    def header(c: FederationClient, node_id: str) -> pb.UpdateHeader:
        return pb.UpdateHeader(session=c._session_pb(), round=0, model_version=rnd.model_version,
                               layout_hash=coord.layout_hash, num_samples=5,
                               tensor=codec.tensor_header(buf, (len(buf) // 4,)),
                               upload_nonce=rnd.nonce_of(node_id))

    assert b.push_raw(header(b, sb.node_id), [bytes(buf)], timeout=10).accepted  # accepted first...
    half = len(buf) // 2

    def slow():  # ...then honest-000 starts streaming, and both are revoked before its stream ends
        yield bytes(buf[:half])
        append(revoked, ["name honest-000", "name honest-001"])
        time.sleep(1.3)  # (the servers look at the list at most every second)
        yield bytes(buf[half:])

    e = _refused(lambda: a.push_raw(header(a, sa.node_id), slow(), timeout=20), timeout=0)
    assert e.code() == C.PERMISSION_DENIED and e.details() == "node 'honest-000' is revoked", e.details()
    assert sb.node_id in rnd.uploads and sa.node_id not in rnd.uploads  # the accepted one stays in its round
    assert rnd.refused.get("permission_denied", 0) >= 1, rnd.refused
