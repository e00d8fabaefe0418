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
