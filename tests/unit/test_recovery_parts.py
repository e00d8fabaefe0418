"""The parts of kill-and-resume that need no process: the kill-point spec, the metrics
rewind of a resumed run, the checkpoint's format marker and identity check."""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator import checkpoint, failpoints
from orchestrator.metrics import MetricsWriter


def test_kill_point_spec():
    assert failpoints.parse("") is None
    assert failpoints.parse("aggregate:3") == ("aggregate", 3)
    for bad in ("aggregate", "apply:1", "collect:x", "collect:-1"):
        with pytest.raises(ValueError, match="point one of collect, aggregate, between, checkpoint"):
            failpoints.parse(bad)


def test_unarmed_kill_point_is_a_no_op():
    failpoints.reached("collect", 0)  # (BYZFED_KILL_AT is not set in the test run)


def test_rewind_keeps_earlier_rounds_and_sets_the_rest_aside(tmp_path):
    m = MetricsWriter(tmp_path)
    for r in range(4):
        m.write({"round": r, "accuracy": r / 10})
    again = MetricsWriter(tmp_path)  # a resumed run reads what was recorded
    assert again.rewind(2) == 2
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.interrupted.jsonl").read_text().splitlines()] == [2, 3]
    assert [r["round"] for r in again.rows] == [0, 1]
    assert again.rewind(2) == 0


def test_checkpoint_round_trip_and_identity(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"global": torch.arange(3.0), "next_round": 2, "seed": 1, "defense": "median"})
    ck = checkpoint.load(path)
    assert ck["format"] == checkpoint.FORMAT and torch.equal(ck["global"], torch.arange(3.0))
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    checkpoint.check_matches(path, ck, {"seed": 1, "defense": "median"})
    with pytest.raises(checkpoint.CheckpointError, match="its defense is 'median', this run's is 'krum'"):
        checkpoint.check_matches(path, ck, {"seed": 1, "defense": "krum"})


def test_node_state_store_starts_a_round_from_the_state_before_it(tmp_path):
    from fednode.node_state import NodeStateStore

    store = NodeStateStore(tmp_path / "n", "honest-0")
    assert store.load_before(0, "feddyn") == ({}, -1)  # a new node: zeros (the strategy's own start)
    for r in range(3):
        store.save(r, "feddyn", {"feddyn_h": torch.full((4,), float(r))})
    assert store.rounds() == [1, 2]  # a checkpoint after every round: the last two
    state, r = store.load_before(3, "feddyn")
    assert r == 2 and torch.equal(state["feddyn_h"], torch.full((4,), 2.0))
    # round 2 run again after a kill: from the state before it, and round 2's file (rolled back) goes
    state, r = store.load_before(2, "feddyn")
    assert r == 1 and torch.equal(state["feddyn_h"], torch.ones(4)) and store.rounds() == [1]
    assert not list((tmp_path / "n").glob("*.tmp"))


def test_node_state_store_keeps_back_to_the_checkpoint_round(tmp_path):
    from fednode.node_state import NodeStateStore

    store = NodeStateStore(tmp_path, "n")
    for r in (0, 2, 3, 5):  # not selected in rounds 1 and 4
        store.save(r, "fedspeed", {"fedspeed_ghat": torch.zeros(2)}, keep_from=2)
    assert store.rounds() == [0, 2, 3, 5]  # a resume from round 2 needs round 0's state
    store.save(6, "fedspeed", {"fedspeed_ghat": torch.zeros(2)}, keep_from=6)
    assert store.rounds() == [5, 6]


def test_node_state_store_refuses_another_nodes_or_a_torn_file(tmp_path):
    from fednode.node_state import NodeStateError, NodeStateStore

    NodeStateStore(tmp_path, "honest-0").save(0, "feddyn", {"feddyn_h": torch.zeros(2)})
    with pytest.raises(NodeStateError, match="its name is 'honest-0', this node's is 'honest-1'"):
        NodeStateStore(tmp_path, "honest-1").load_before(1, "feddyn")
    with pytest.raises(NodeStateError, match="its algorithm is 'feddyn', this node's is 'fedspeed'"):
        NodeStateStore(tmp_path, "honest-0").load_before(1, "fedspeed")
    path = tmp_path / "state-0.pt"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(NodeStateError, match="state-0.pt is not a readable node state file"):
        NodeStateStore(tmp_path, "honest-0").load_before(1, "feddyn")
