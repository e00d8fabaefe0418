"""Cross-device churn with real processes on 127.0.0.1: crashes by SIGKILL mid-upload,
deadlines and quorum, late joiners, re-joins, and asynchronous (FedBuff) aggregation.

Runner-driven tests go through ``orchestrator.runner.run_scenario`` (training slots,
light idle nodes, crash restarts: as ``./launch.sh run``); the probe tests use the
in-process harness. Every process is stopped by PID.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fednode.client import FederationClient
from orchestrator.scenario import Scenario, load
from tests.integration import harness
from tests.integration.harness import Federation, node_log, run


BASE: dict[str, Any] = {"name": "churn", "seed": 0, "model": {"name": "mlp"}, "data": {"dataset": "mnist5k"},
                       "training": {"lr": 0.05, "batch_size": 32},
                       "federation": {"rounds": 4, "round_timeout": 60.0, "lease_seconds": 4.0},
                       "defense": {"name": "mean"}, "adversary": {"collusion": "off"},
                       "output": {"live": False, "plot": False, "checkpoint_every": 0}}


def scenario(**sections: Any) -> Scenario:
    return harness.scenario(BASE, **sections)


def crashes(run_dir: Path, phase_words: str = "uploading") -> dict[int, set[str]]:
    """round -> nodes that logged an injected crash of that phase."""
    out: dict[int, set[str]] = {}
    for path in (run_dir / "nodes").glob("*.log"):
        for r in re.findall(rf"round (\d+): crash injected while {phase_words}", path.read_text()):
            out.setdefault(int(r), set()).add(path.stem)
    return out


def test_30_percent_of_selected_nodes_sigkilled_mid_upload_each_round(tmp_path):
    """10 light nodes sampled per round; the 3 victims SIGKILL themselves from inside their
    upload stream in every round they are selected for and are restarted 1 s later with
    their identity (their leases outlive the restart, so they are selected again)."""
    s = scenario(federation={"rounds": 3, "selection": "sample", "sample_size": 10, "quorum": 0.5,
                             "round_timeout": 60.0, "lease_seconds": 6.0, "idle_nodes": "light"},
                 roles=[{"name": "dev", "count": 7},
                        {"name": "victim", "count": 3, "crash_phase": "upload", "crash_probability": 1.0,
                         "restart_after_seconds": 1.0}])
    summary, rows = run(s, tmp_path)
    assert len(rows) == 3 and summary["rounds_completed"] == 3, [r["outcome"] for r in rows]
    killed = crashes(tmp_path)
    for r in rows:
        victims = killed.get(r["round"], set())
        assert r["selected"] == 10 and victims == {"victim-000", "victim-001", "victim-002"}, (r["round"], victims)
        # every victim is accounted for as dropped mid-upload; reported + dropped == selected
        assert r["dropped"] == {"download": 0, "train": 0, "upload": 3} and r["reported"] == 7
        assert set(r["dropped_at"]) == victims and set(r["dropped_at"].values()) == {"upload"}
        assert r["refused"].get("broken_stream", 0) == 3  # the half-sent streams, discarded
        assert r["outcome"] == "dead-nodes" and r["accuracy"] is not None  # closed early, with quorum
        assert r["t_collect"] < 55
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    # a restarted victim re-joins with its node id (same secret)
    log = node_log(tmp_path, "victim-000")
    first = re.search(r"\bjoined as (\S+)", log).group(1)
    assert set(re.findall(r"re-joined as (\S+)", log)) == {first}, log


def test_deadline_closes_a_round_with_quorum_and_the_straggler_is_refused_late(tmp_path):
    s = scenario(federation={"rounds": 3, "round_timeout": 9.0, "quorum": 0.5},  # round 0 includes warm-up
                 roles=[{"name": "fast", "count": 3}, {"name": "slow", "count": 1, "train_delay_s": 10.0}])
    _, rows = run(s, tmp_path)
    for r in rows:
        assert r["outcome"] == "deadline" and "slow-000" in r["missing"], r
        # the straggler is lost in training, or (still busy with an older round) before its download
        assert r["dropped_at"]["slow-000"] in ("train", "download") and r["late"] >= 1
        assert r["reported"] + sum(r["dropped"].values()) == r["selected"] == 4
        assert r["accuracy"] is not None and 5.5 < r["t_collect"] < 20
    assert all(r["reported"] == 3 for r in rows[1:])  # (round 0 includes the nodes' warm-up)
    assert [r["model_version"] for r in rows] == [0, 1, 2]
    assert sum(r["late_refused"] for r in rows) >= 1  # its round-0 upload came after the close
    assert re.search(r"FAILED_PRECONDITION stale upload for round \d+", node_log(tmp_path, "slow-000"))


def test_a_round_below_quorum_is_abandoned_and_recorded(tmp_path):
    """Two of four nodes crash (SIGKILL while training) in round 1; quorum 0.75 needs three."""
    s = scenario(federation={"rounds": 3, "quorum": 0.75, "lease_seconds": 2.0},
                 roles=[{"name": "ok", "count": 2},
                        {"name": "doomed", "count": 2, "crash_phase": "train", "crash_at_round": 1}])
    summary, rows = run(s, tmp_path)
    r1 = rows[1]
    assert r1["outcome"].startswith("abandoned: 2 of 4 reported, quorum 3"), r1["outcome"]
    assert r1["dropped"] == {"download": 0, "train": 2, "upload": 0} and r1.get("accuracy") is None
    assert r1["t_collect"] < 30  # closed when the dead nodes' leases ran out, not at the deadline
    assert rows[2]["model_version"] == rows[1]["model_version"] == 1  # nothing was applied
    assert sorted(rows[2]["evicted"]) == ["doomed-000", "doomed-001"]
    assert rows[2]["selected"] == 2 and rows[2]["outcome"] == "complete"
    assert summary["rounds_abandoned"] == 1 and summary["rounds_completed"] == 2


def test_late_joiners_honest_and_byzantine_enter_selection(tmp_path):
    s = scenario(federation={"rounds": 6, "selection": "sample", "sample_size": 8, "round_timeout": 60.0},
                 defense={"name": "median", "f": 2},
                 # (0.4 s per round at least: the node started after 1 s joins while rounds remain)
                 roles=[{"name": "honest", "count": 4, "train_delay_s": 0.4},
                        {"name": "late", "count": 1, "join_at_round": 2},
                        {"name": "byzlate", "count": 1, "byzantine": True, "attack": "sign_flip",
                         "join_at_round": 2},
                        {"name": "later", "count": 1, "join_after_seconds": 1.0}])
    _, rows = run(s, tmp_path)
    assert "late-000" not in rows[1]["selected_nodes"] and "byzlate-000" not in rows[1]["selected_nodes"]
    assert {"late-000", "byzlate-000"} <= set(rows[2]["joined"])
    for r in rows[2:]:
        assert {"late-000", "byzlate-000"} <= set(r["selected_nodes"]), r["selected_nodes"]
        assert r["byzantine_selected"] == 1 and r["reported"] == r["selected"]
    # the node started 1 s after the run is selected from the first round after its join
    # (a row's "joined" lists the joins before its selection)
    at = next(i for i, r in enumerate(rows) if "later-000" in r["joined"])
    for r in rows[at:]:
        assert "later-000" in r["selected_nodes"] and r["reported"] == 7, r
    assert all("later-000" not in r["selected_nodes"] for r in rows[:at])
    assert "round 2: attack sign_flip active" in node_log(tmp_path, "byzlate-000")


def test_rejoin_keeps_identity_and_an_upload_in_flight_for_a_closed_round_is_refused(run_dir):
    """A probe takes part in round 0, then in round 1 starts an upload stream and holds it
    open past the round's deadline: the finished stream is refused as stale. After its lease
    ran out it re-joins with its credentials and gets its node id back."""
    s = scenario(federation={"rounds": 3, "round_timeout": 5.0, "lease_seconds": 1.5, "min_nodes": 3,
                             "quorum": 0.5},
                 roles=[{"name": "honest", "count": 2}, {"name": "probe", "count": 1}])
    fed = Federation(s, run_dir, spawn=["honest-000", "honest-001"])
    with fed:
        probe = FederationClient(fed.address)
        sess = probe.join("probe-000", "probe-secret", fed.token)
        beating = threading.Event()
        beating.set()

        def heartbeats():  # keep the probe's lease until the refusal
            while beating.is_set():
                probe.heartbeat()
                time.sleep(0.3)

        threading.Thread(target=heartbeats, daemon=True).start()
        d = sess.layout.d
        zeros = memoryview(torch.zeros(d).numpy()).cast("B")

        def task_of(round_id):
            for _ in range(20):
                task = probe.get_task(wait_seconds=20)
                if task.kind == "train" and task.round == round_id:
                    return task
            raise AssertionError(f"no task for round {round_id}")

        t0 = task_of(0)
        probe.push_update(t0.round, t0.model_version, torch.zeros(d), 10)
        task = task_of(1)

        def slow_chunks():
            yield bytes(zeros[:len(zeros) // 2])
            time.sleep(7.0)  # the round's deadline (5 s) passes meanwhile
            yield bytes(zeros[len(zeros) // 2:])

        with pytest.raises(grpc.RpcError) as info:
            probe.push_raw(probe.update_header(task.round, task.model_version, zeros, 10), slow_chunks())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "round 1 closed" in info.value.details(), info.value.details()
        beating.clear()
        fed.wait_for(lambda: not fed.coord.membership.is_alive(sess.node_id), timeout=20)  # lease ran out
        again = FederationClient(fed.address).join("probe-000", "probe-secret", fed.token)
        assert again.node_id == sess.node_id and again.rejoined
        fed.wait()
    rows = fed.rows()
    assert rows[1]["outcome"] == "deadline" and rows[1]["reported"] == 2
    assert rows[1]["dropped_at"] == {"probe-000": "upload"}
    assert sum(r["late_refused"] for r in rows[1:]) >= 1


def test_async_mode_refuses_over_stale_uploads_and_converges(tmp_path):
    """FedBuff: B = 3, max staleness 2, polynomial weighting; a straggler's updates arrive
    too stale and are refused with FAILED_PRECONDITION."""
    s = scenario(federation={"mode": "async", "rounds": 40, "buffer_size": 3, "max_staleness": 2,
                             "staleness_weighting": "polynomial", "staleness_exponent": 0.5, "round_timeout": 60.0},
                 defense={"name": "median", "f": 1},
                 roles=[{"name": "fast", "count": 5}, {"name": "slow", "count": 1, "train_delay_s": 1.0}])
    summary, rows = run(s, tmp_path)
    assert len(rows) == 40 and all(r["mode"] == "async" and r["outcome"] == "complete" for r in rows)
    # staleness is checked (<= 2) against the last published version when an update is accepted;
    # at aggregation it can be 2 more: an aggregation may be under way then (its version not yet
    # published), and the 6 nodes' updates can put B = 3 others ahead of it in the buffer
    assert all(r["reported"] == 3 and r["staleness_max"] <= 2 + 2 for r in rows)
    assert [r["model_version"] for r in rows] == list(range(40))
    assert any(r["staleness_max"] > 0 for r in rows)
    assert sum(r["refused"].get("stale", 0) for r in rows) >= 1
    log = node_log(tmp_path, "slow-000")
    assert re.search(r"FAILED_PRECONDITION stale: based on version \d+, current \d+, max staleness 2", log), log
    assert summary["final_accuracy"] > 0.8, summary


@pytest.mark.slow  # the benchmark run (bench/cross_device.py): 100 processes, ~15 minutes on 2 cores
@pytest.mark.timeout(3600)
def test_cross_device_scenario_with_100_processes(tmp_path):
    s = load(Path(__file__).resolve().parents[2] / "scenarios" / "cross-device.toml",
             ["output.live=false", "output.plot=false"])
    summary, rows = run(s, tmp_path)
    assert summary["rounds_completed"] + summary["rounds_abandoned"] == 20 and summary["rounds_completed"] >= 18
    for r in rows:
        assert r["reported"] + sum(r["dropped"].values()) == r["selected"] == 24
    assert any("byz-late-000" in r["selected_nodes"] for r in rows[5:])
    assert summary["final_accuracy"] > 0.6
