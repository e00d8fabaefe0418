"""The aggregation group with real processes: W orchestrator ranks (rank 0 in this
process, the others started by the runner as ``python -m orchestrator rank``) on a
real gloo group over 127.0.0.1, real node processes uploading to the rank each is
assigned at its join.

- W = 2 ends on the very model W = 1 ends on (same seeds, same uploads), with
  uploads spread over both ranks and Byzantine nodes in the federation;
- an aggregation rank SIGKILLed mid-run is survived: the group re-forms without it,
  the round in progress is recorded as abandoned with the reason, its nodes re-join
  another rank, the round runs again and the later rounds complete with every node;
- a node uploading to a rank that does not serve it is refused with
  FAILED_PRECONDITION naming its rank.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from orchestrator import checkpoint
from tests.integration.harness import run, scenario

ROLES = [{"name": "honest", "count": 5},
         {"name": "signflip", "count": 2, "byzantine": True, "attack": "sign_flip"}]


def _scenario(ranks: int, rounds: int = 3, **extra):
    return scenario(aggregation={"ranks": ranks, "timeout_seconds": 30.0},
                    federation={"rounds": rounds, "round_timeout": 30.0, "lease_seconds": 3.0},
                    defense={"name": "median"}, roles=ROLES, **extra)


def _final_weights(run_dir: Path) -> torch.Tensor:
    return checkpoint.load(run_dir / "checkpoint.pt")["global"]


def test_two_ranks_end_on_the_one_rank_model(tmp_path):
    s1, rows1 = run(_scenario(1), tmp_path / "w1")
    s2, rows2 = run(_scenario(2), tmp_path / "w2")
    assert [r["outcome"] for r in rows2] == ["complete"] * 3
    assert [r["reported"] for r in rows2] == [7] * 3
    assert rows2[-1]["accuracy"] > rows2[0]["accuracy"] - 0.02
    # the same rounds on the same uploads: the same model, bit for bit
    assert torch.equal(_final_weights(tmp_path / "w1"), _final_weights(tmp_path / "w2"))
    assert [r["accuracy"] for r in rows1] == [r["accuracy"] for r in rows2]
    # both ranks ingested: some nodes were handed rank 1's address at their join
    rank1 = (tmp_path / "w2" / "ranks" / "rank-1.log").read_text()
    endpoint = rank1.split("ingest endpoint ")[1].split()[0]
    logs = [p.read_text() for p in (tmp_path / "w2" / "nodes").glob("*.log")]
    on_rank1 = sum(f"uploads to {endpoint}" in text for text in logs)
    assert 1 <= on_rank1 < len(logs)


def test_a_killed_rank_is_survived(tmp_path):
    run_dir = tmp_path / "run"
    s = _scenario(3, rounds=6)
    pid_file = run_dir / "ranks" / "rank-2.pid"
    killed: list[int] = []

    def kill_rank_2() -> None:
        end = time.monotonic() + 200
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < end:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 and pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    threading.Thread(target=kill_rank_2, daemon=True).start()
    summary, rows = run(s, run_dir)
    assert killed, "rank 2 was never killed"
    failed = [r for r in rows if "group" in r]
    assert len(failed) == 1, [r["outcome"] for r in rows]
    info = failed[0]["group"]
    assert info["ranks_lost"] == [2] and info["ranks"] == [0, 1] and info["generation"] == 1
    assert failed[0]["outcome"].startswith("abandoned: aggregation rank(s) [2] failed")
    after = rows[rows.index(failed[0]) + 1:]
    assert after and all(r["outcome"] == "complete" for r in after)
    assert after[0]["round"] == failed[0]["round"]  # the round ran again on the re-formed group
    # the moved nodes re-joined (another rank) before the next round: every node reports again
    assert after[-1]["reported"] == 7
    assert info["nodes_moved"] >= 1
    assert summary["rounds_completed"] == 6
    # the survivor followed the re-formed group to the end (and exited by itself)
    rank1 = (run_dir / "ranks" / "rank-1.log").read_text()
    assert "after the group re-formed (generation 1)" in rank1


def test_upload_to_the_wrong_rank_is_refused(tmp_path):
    from orchestrator.coordinator import Coordinator
    from orchestrator.identity import SessionKeys
    from orchestrator.servicer import serve
    from proto import codec
    from proto.byzfed.v1 import federation_pb2 as pb
    from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc

    s = _scenario(1)
    keys = SessionKeys()
    coord = Coordinator(s, tmp_path, "tok", keys=keys)
    server, port = serve(coord, "127.0.0.1", 0, 8)
    try:
        member, _ = coord.membership.join("honest-000", "secret", "tok", 1, 0)
        node = member.node_id
        assert node == keys.node_id(0, "honest-000") and member.token == keys.token(node)
        coord.owners = {node: 1}  # the open round's selection says: rank 1 ingests this node
        coord.open_round(0, {node}, 30.0, 1.0)
        delta = torch.zeros(coord.layout.d).numpy().tobytes()
        header = pb.UpdateHeader(session=pb.Session(node_id=node, session_token=keys.token(node)), round=0,
                                 model_version=0, num_samples=1, layout_hash=coord.layout_hash,
                                 tensor=codec.tensor_header(memoryview(delta), (coord.layout.d,)),
                                 upload_nonce=keys.nonce(0, 0, node))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.FederationStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.PushUpdate(iter([pb.UpdateChunk(header=header), pb.UpdateChunk(data=delta)]), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "aggregation rank 1" in e.value.details()
        assert not coord.keeper.current.uploads
    finally:
        server.stop(grace=0)


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from /proc, right now)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow  # ~25 s; beyond the default run's budget: ./launch.sh test -m slow tests/integration/test_group.py
def test_a_killed_leader_leaves_a_checkpoint_that_resumes(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    toml = tmp_path / "s.toml"
    toml.write_text('name = "leader"\nseed = 0\n[model]\nname = "mlp"\n[training]\nlr = 0.05\nbatch_size = 32\n'
                    '[federation]\nrounds = 5\nround_timeout = 30.0\nlease_seconds = 3.0\n'
                    '[aggregation]\nranks = 2\ntimeout_seconds = 30.0\n[defense]\nname = "median"\n'
                    '[output]\nlive = false\nplot = false\ncheckpoint_every = 1\n'
                    '[[roles]]\nname = "honest"\ncount = 4\n')
    argv = [sys.executable, "-m", "orchestrator", "run", str(toml), "--run-dir", str(run_dir)]
    leader = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stray: list[int] = []
    try:
        metrics = run_dir / "metrics.jsonl"
        end = time.monotonic() + 180
        while time.monotonic() < end and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert leader.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
        stray = _descendants(leader.pid)
        rank1 = int((run_dir / "ranks" / "rank-1.pid").read_text())
        assert rank1 in stray
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        # the other rank sees its leader gone and ends by itself, within the collectives' timeout
        end = time.monotonic() + 45
        while time.monotonic() < end and not _gone(rank1):
            time.sleep(0.1)
        assert _gone(rank1), "rank 1 outlived its leader"
        assert "could not re-form (the leader is gone?)" in (run_dir / "ranks" / "rank-1.log").read_text()
    finally:
        for pid in [leader.pid, *stray]:  # (the killed leader's nodes, by PID)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    done = checkpoint.load(run_dir / "checkpoint.pt")["next_round"]
    assert done >= 2
    resumed = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=240)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    import json
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows][-(5 - done):] == list(range(done, 5))
    assert all(r["outcome"] == "complete" for r in rows[-(5 - done):])
