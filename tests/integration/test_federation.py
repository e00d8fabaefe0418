"""A real orchestrator and real node processes on 127.0.0.1 (gRPC, no mocks)."""
from __future__ import annotations

import signal

import grpc
import pytest
import torch

from fednode.client import FederationClient
from proto import codec
from tests.integration.harness import Federation, scenario


def test_accuracy_rises_over_rounds(run_dir):
    s = scenario(federation={"rounds": 4}, roles=[{"name": "honest", "count": 4}])
    with Federation(s, run_dir) as fed:
        summary = fed.wait()
    rows = fed.rows()
    assert [r["outcome"] for r in rows] == ["complete"] * 4
    assert all(r["reported"] == 4 for r in rows)
    accs = [r["accuracy"] for r in rows]
    assert accs[-1] > accs[0] + 0.02 and accs[-1] > 0.8, accs
    assert summary["rounds_completed"] == 4
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoint.pt").exists()


def test_sigkilled_node_does_not_stall_the_round(run_dir):
    # A long lease keeps the dead node "alive" on paper: only the deadline can close the round.
    s = scenario(federation={"rounds": 4, "round_timeout": 8.0, "lease_seconds": 60.0, "quorum": 0.5},
                 roles=[{"name": "honest", "count": 4}])
    victim = "honest-002"

    def kill_mid_round(kind, info):
        if kind == "round_open" and info["round"] == 2:
            fed.children.kill(victim, signal.SIGKILL)

    fed = Federation(s, run_dir, on_event=kill_mid_round)
    with fed:
        fed.wait()
    rows = fed.rows()
    assert rows[1]["reported"] == 4  # (round 0 includes the nodes' warm-up)
    r2 = rows[2]
    assert r2["outcome"] == "deadline" and r2["reported"] == 3 and r2["missing"] == [victim]
    assert 7.5 <= r2["t_collect"] < 20, r2["t_collect"]
    assert r2["accuracy"] is not None  # closed with quorum and applied
    assert fed.children.procs[victim].poll() == -signal.SIGKILL
    assert len(rows) == 4 and rows[3]["reported"] == 3 and rows[3]["accuracy"] is not None


def test_late_node_takes_part_from_the_next_round(run_dir):
    s = scenario(federation={"rounds": 5, "min_nodes": 4}, roles=[{"name": "honest", "count": 5}])
    late = "honest-004"
    early = [n for n in dict(s.node_roles()) if n != late]

    def start_late(kind, info):
        if kind == "round_open" and info["round"] == 1:
            fed.start_node(late)
            # hold the round loop (round 1 is open) until the late node has joined
            fed.wait_for(lambda: any(m.name == late for m in fed.coord.membership.alive()), timeout=60)

    fed = Federation(s, run_dir, spawn=early, on_event=start_late)
    with fed:
        fed.wait()
    rows = fed.rows()
    assert rows[0]["selected"] == 4 and rows[1]["selected"] == 4
    # it joined while round 1 was open (a row lists the joins seen before its round opened)
    assert late in rows[2]["joined"]
    assert [r["selected"] for r in rows] == [4, 4, 5, 5, 5]
    assert all(r["reported"] == 5 for r in rows[2:])


def _raises(code, fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    return info.value.details()


def test_every_bad_upload_is_refused_and_changes_nothing(run_dir):
    """A probe client joins as a scenario member and sends every kind of bad upload
    in round 1 while three real nodes train; then a good one. The round closes with
    all four updates and the refusals counted; nothing else is disturbed."""
    s = scenario(federation={"rounds": 3, "min_nodes": 5, "round_timeout": 60.0, "lease_seconds": 120.0},
                 roles=[{"name": "honest", "count": 3}, {"name": "probe", "count": 2}])
    fed = Federation(s, run_dir, spawn=["honest-000", "honest-001", "honest-002"])
    with fed:
        probe = FederationClient(fed.address)
        _raises(grpc.StatusCode.UNAUTHENTICATED, lambda: probe.join("probe-000", "s3cret", "wrong-token"))
        _raises(grpc.StatusCode.PERMISSION_DENIED, lambda: probe.join("intruder", "s3cret", fed.token))
        sess = probe.join("probe-000", "s3cret", fed.token)
        _raises(grpc.StatusCode.UNAUTHENTICATED, lambda: FederationClient(fed.address).join("probe-000", "other", fed.token))
        again = FederationClient(fed.address).join("probe-000", "s3cret", fed.token)
        assert again.node_id == sess.node_id and again.rejoined  # idempotent re-join
        # a second probe holds each round open until the test lets it close
        holder = FederationClient(fed.address)
        holder.join("probe-001", "h", fed.token)

        def honest_round(r, client=probe):
            for _ in range(6):  # the other nodes may still be starting
                task = client.get_task(wait_seconds=20)
                if task.kind != "wait":
                    break
            assert task.kind == "train" and task.round == r
            return task

        def release(r):
            t = honest_round(r, holder)
            holder.push_update(t.round, t.model_version, torch.zeros(sess.layout.d), 10)

        t0 = honest_round(0)
        probe.push_update(t0.round, t0.model_version, torch.zeros(sess.layout.d), 10)
        release(0)
        fed.wait_for(lambda: fed.coord.keeper.current.round_id == 1 and not fed.coord.keeper.current.closed)
        task = honest_round(1)
        d = sess.layout.d
        good = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 1e-3
        buf = codec.tensor_bytes(good)
        r, v = task.round, task.model_version
        global_before = fed.coord.model.weights.clone()

        def push(delta=good, **over):
            return probe.push_update(r, v, delta, 10, **over)

        codes = {
            "bad token": _raises(grpc.StatusCode.UNAUTHENTICATED, lambda: push(session_token="0" * 32)),
            "other node's id": _raises(grpc.StatusCode.UNAUTHENTICATED, lambda: push(node_id="n0000-000000")),
            "stale round": _raises(grpc.StatusCode.FAILED_PRECONDITION, lambda: probe.push_update(r - 1, v, good, 10)),
            "future round": _raises(grpc.StatusCode.FAILED_PRECONDITION, lambda: probe.push_update(r + 1, v, good, 10)),
            "model version": _raises(grpc.StatusCode.FAILED_PRECONDITION, lambda: probe.push_update(r, v - 1, good, 10)),
            "layout hash": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: push(layout_hash="deadbeef")),
            "dtype": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: push(dtype="float64")),
            "byte count": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: push(torch.zeros(d - 1))),
            "declared vs sent": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: probe.push_raw(
                probe.update_header(r, v, buf, 10), codec.iter_chunks(buf[:-4096]))),
            "oversized": _raises(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: probe.push_raw(
                probe.update_header(r, v, buf, 10), list(codec.iter_chunks(buf)) + [b"\0" * 64])),
            "checksum": _raises(grpc.StatusCode.DATA_LOSS, lambda: push(crc32=12345)),
            "nan": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: push(torch.full((d,), float("nan")))),
            "inf": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: push(good.clone().index_fill_(0, torch.tensor([7]), float("inf")))),
            "samples": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: probe.push_update(r, v, good, 0)),
            "no header": _raises(grpc.StatusCode.INVALID_ARGUMENT, lambda: probe._upload_stub.PushUpdate(
                iter([codec.pb.UpdateChunk(data=b"1234")]))),
        }
        assert "non-finite" in codes["nan"] and "CRC" in codes["checksum"]
        rnd = fed.coord.keeper.current
        assert rnd.round_id == r and not rnd.closed and sess.node_id not in rnd.uploads
        assert torch.equal(fed.coord.model.weights, global_before)
        reply = push()
        assert reply.accepted and reply.bytes_received == 4 * d
        codes["duplicate"] = _raises(grpc.StatusCode.ALREADY_EXISTS, lambda: push())
        assert sess.node_id in rnd.uploads and torch.equal(fed.coord.store.row(sess.node_id), good)
        release(1)
        t2 = honest_round(2)
        probe.push_update(t2.round, t2.model_version, torch.zeros(d), 10)
        release(2)
        fed.wait()
        late = _raises(grpc.StatusCode.FAILED_PRECONDITION, lambda: push())
        assert "stale" in late
    rows = fed.rows()
    assert [row["reported"] for row in rows] == [5, 5, 5]
    assert sum(rows[1]["refused"].values()) == len(codes), (rows[1]["refused"], len(codes))
    assert rows[1]["accuracy"] is not None and rows[2]["accuracy"] >= rows[0]["accuracy"]


def test_nodes_reconnect_after_the_orchestrator_was_unreachable(run_dir):
    """The gRPC server goes away while a round is open, then comes back on the
    same port: nodes retry with backoff, keep their identity and the round
    completes. (Eviction and re-join after a longer cut: test_churn.py.)"""
    from orchestrator.servicer import serve

    s = scenario(federation={"rounds": 4, "round_timeout": 60.0, "lease_seconds": 15.0},
                 roles=[{"name": "honest", "count": 4}])
    ids_before = {}

    def outage(kind, info):
        if kind == "round_open" and info["round"] == 2:
            ids_before.update({m.name: m.node_id for m in fed.coord.membership.alive()})
            fed.server.stop(grace=0).wait()
            import time
            time.sleep(3.0)
            fed.server, _ = serve(fed.coord, "127.0.0.1", fed.port, 64)

    fed = Federation(s, run_dir, on_event=outage)
    with fed:
        fed.wait()
    rows = fed.rows()
    assert [r["reported"] for r in rows] == [4, 4, 4, 4], [r["outcome"] for r in rows]
    assert {m.name: m.node_id for m in fed.coord.membership.members()} == ids_before  # no new identities
    logs = "".join((run_dir / "nodes" / f"honest-00{i}.log").read_text() for i in range(4))
    assert "unreachable" in logs
