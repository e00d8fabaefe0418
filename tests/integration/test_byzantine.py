"""Byzantine nodes end to end: real orchestrator, real node processes on 127.0.0.1.

Each test runs a scenario through ``orchestrator.runner.run_scenario`` (which
starts the collusion service and the adversary view like ``./launch.sh run``)
and stops every process it started by PID.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from orchestrator.launch import ChildProcesses, behaviour_json
from orchestrator.scenario import RoleSection, Scenario, ScenarioError
from tests.integration import harness
from tests.integration.harness import Federation, node_log, run


BASE: dict[str, Any] = {"name": "byz", "seed": 0, "model": {"name": "mlp"}, "data": {"dataset": "mnist5k"},
                       "training": {"lr": 0.05, "batch_size": 32, "momentum": 0.5},
                       "federation": {"rounds": 5, "round_timeout": 60.0, "lease_seconds": 6.0},
                       "defense": {"name": "mean"},
                       "output": {"live": False, "plot": False, "checkpoint_every": 0}}


def scenario(**sections: Any) -> Scenario:
    return harness.scenario(BASE, **sections)


def sent_crcs(log: str, attack: str) -> dict[int, str]:
    return {int(r): c for r, c in re.findall(rf"round (\d+): {attack} update sent \(crc32 ([0-9a-f]+)", log)}


def honest_and(byzantine: dict, honest: int) -> list[dict]:
    return [{"name": "honest", "count": honest}, {"name": byzantine.pop("name", "byz"), "byzantine": True, **byzantine}]


# --------------------------------------------------------------------------- mean vs median

@pytest.mark.parametrize("attack, params", [
    ("sign_flip", {"scale": 4.0}),
    pytest.param("untargeted", {"tau": 10.0}, marks=pytest.mark.slow),
])
def test_attack_from_3_of_10_breaks_mean_but_not_median(tmp_path, attack, params):
    roles = honest_and({"count": 3, "attack": attack, "attack_params": params}, honest=7)
    acc = {}
    for rule in ("mean", "median"):
        summary, rows = run(scenario(defense={"name": rule, "f": 3}, roles=roles), tmp_path / rule)
        assert [r["outcome"] for r in rows] == ["complete"] * 5, rows
        assert all(r["reported"] == 10 and r["byzantine_selected"] == 3 for r in rows)
        acc[rule] = summary["final_accuracy"]
    print(f"{attack}: final accuracy mean {acc['mean']:.4f}, median {acc['median']:.4f}")
    assert acc["mean"] < 0.3, acc
    assert acc["median"] > 0.8, acc


# --------------------------------------------------------------------------- time-varying

def test_late_byzantine_attacks_from_its_first_round_and_a_leaver_rejoins(tmp_path):
    roles = [{"name": "honest", "count": 4},
             {"name": "joiner", "byzantine": True, "attack": "sign_flip", "attack_params": {"scale": 50.0},
              "join_at_round": 3},
             {"name": "churn", "byzantine": True, "attack": "sign_flip", "leave_at_round": 1, "rejoin_at_round": 3}]
    _, rows = run(scenario(roles=roles), tmp_path)
    assert len(rows) == 5 and all(r.get("accuracy") is not None for r in rows), rows
    # The joiner starts with round 3 (the orchestrator waits for it before selecting).
    assert "joiner-000" in rows[3]["joined"] and [r["byzantine_selected"] for r in rows] == [1, 1, 0, 2, 2]
    log = node_log(tmp_path, "joiner-000")
    active = [int(r) for r in re.findall(r"round (\d+): attack sign_flip active", log)]
    assert active[0] == 3 and set(sent_crcs(log, "sign_flip")) == {3, 4}, log
    # Seen from the server: the mean moved ~9x further in round 3 than in round 2.
    assert rows[3]["update_norm"] > 3 * rows[2]["update_norm"], [r["update_norm"] for r in rows]
    assert rows[3]["accuracy"] < rows[2]["accuracy"]
    # churn left at round 1 (missing there) and came back at round 3 with the same node id.
    assert rows[1]["missing"] == ["churn-000"] and "churn-000" in rows[2]["left"] and "churn-000" in rows[3]["joined"]
    log = node_log(tmp_path, "churn-000")
    first = re.search(r"joined as (\S+)", log).group(1)
    assert re.search(r"re-joined as (\S+) \(round 3\)", log).group(1) == first, log
    assert set(sent_crcs(log, "sign_flip")) == {0, 3, 4}


# --------------------------------------------------------------------------- collusion

def test_colluding_alie_nodes_share_statistics_through_the_collusion_service(tmp_path):
    group = ["alie-000", "alie-001", "alie-002"]
    roles = honest_and({"name": "alie", "count": 3, "attack": "alie"}, honest=4)
    _, rows = run(scenario(federation={"rounds": 3}, roles=roles), tmp_path)
    assert [r["reported"] for r in rows] == [7, 7, 7]
    record = json.loads((tmp_path / "adversary.json").read_text())
    assert record["group"] == group
    for r in ("0", "1", "2"):
        h = record["collusion"][r]
        assert h["announced"] == group and h["posted"] == group
        assert sorted(h["fetches"]) == [[m, 3] for m in group]  # every colluder got all 3 benign deltas
    crcs = [sent_crcs(node_log(tmp_path, m), "alie") for m in group]
    assert set(crcs[0]) == {0, 1, 2} and crcs[0] == crcs[1] == crcs[2]  # same statistics -> same row
    for m in group:
        assert "round 0: colluders 3 (alie-000,alie-001,alie-002)" in node_log(tmp_path, m)


# --------------------------------------------------------------------------- omniscient view

def test_omniscient_attack_refuses_to_start_without_the_adversary_view(tmp_path):
    roles = honest_and({"name": "mimic", "attack": "mimic"}, honest=3)
    with pytest.raises(ScenarioError, match="needs the adversary view"):
        scenario(roles=roles)
    with pytest.raises(ScenarioError, match="needs the adversary view"):
        scenario(roles=honest_and({"name": "ipm", "attack": "ipm", "knowledge": "omniscient"}, honest=3))
    # A node launched by hand with an omniscient attack and no view address refuses to start
    # (exit status 2) before it joins the (running) federation.
    s = scenario(roles=[{"name": "honest", "count": 2}])
    with Federation(s, tmp_path, spawn=[]) as fed:
        role = RoleSection(name="honest", byzantine=True, attack="mimic")
        children = ChildProcesses()
        try:
            argv = [sys.executable, "-m", "fednode", "--orchestrator", fed.address, "--name", "honest-000",
                    "--token", fed.token, "--behaviour", behaviour_json(role, s.seed)]
            proc = children.spawn("mimic", argv, tmp_path / "mimic.log")
            assert proc.wait(60) == 2
        except subprocess.TimeoutExpired:
            pytest.fail("the omniscient node did not refuse to start")
        finally:
            children.stop_all(grace=2.0)
        assert fed.coord.membership.alive() == []
    assert "refusing to start" in (tmp_path / "mimic.log").read_text()
    assert "needs the adversary view" in (tmp_path / "mimic.log").read_text()


def test_omniscient_view_serves_honest_updates_when_enabled(tmp_path):
    roles = honest_and({"name": "ipm", "count": 2, "attack": "ipm", "attack_params": {"epsilon": 0.5},
                        "knowledge": "omniscient"}, honest=4)
    _, rows = run(scenario(federation={"rounds": 2}, adversary={"omniscient": True, "view_timeout": 20.0},
                           roles=roles), tmp_path)
    assert [r["reported"] for r in rows] == [6, 6]
    served = json.loads((tmp_path / "adversary.json").read_text())["adversary_view"]
    for r in ("0", "1"):  # each Byzantine node read the 4 honest updates (and only those)
        assert sorted(served[r]) == [["ipm-000", 4, 4], ["ipm-001", 4, 4]]
    for m in ("ipm-000", "ipm-001"):
        log = node_log(tmp_path, m)
        assert "round 1: adversary view served 4 honest updates" in log and set(sent_crcs(log, "ipm")) == {0, 1}


# --------------------------------------------------------------------------- wire

@pytest.mark.slow  # beyond the acceptance (test_federation covers every bad upload); rounds wait for their deadline
def test_malformed_uploads_are_refused_and_the_run_goes_on(tmp_path):
    roles = [{"name": "honest", "count": 3},
             {"name": "crc", "byzantine": True, "attack": "malformed", "attack_params": {"mode": "bad_checksum"}},
             {"name": "nan", "byzantine": True, "attack": "nonfinite", "attack_params": {"fraction": 0.01}}]
    t0 = time.monotonic()
    _, rows = run(scenario(federation={"rounds": 2, "round_timeout": 15.0, "quorum": 0.5}, roles=roles), tmp_path)
    assert time.monotonic() - t0 < 120
    for r in rows:
        assert r["reported"] == 3 and r["outcome"] == "deadline" and r["accuracy"] is not None
        assert r["refused"].get("checksum") == 1 and r["refused"].get("invalid") == 1, r["refused"]
        assert sorted(r["missing"]) == ["crc-000", "nan-000"]
    assert rows[-1]["accuracy"] > 0.7
