"""Kill and resume in asynchronous mode (FedBuff, ``orchestrator/async_mode.py``), real
processes: the orchestrator SIGKILLs itself at a kill point, is started again on the
same ``--run-dir`` and goes on from the checkpoint of its last aggregation (model,
version, step, buffer policy); fresh node processes join and are served tasks of the
checkpoint's version, the buffered updates and open uploads of the killed run are lost
and recorded as such in ``resumed.jsonl``.

- Deterministic setting (``buffer_size`` = the number of nodes, ``max_staleness = 0``:
  every step aggregates one update of every node, all of the current version, in
  node-id order): killed during collection (step 2's first update buffered), resumed,
  it ends on the uninterrupted run's model bit for bit.
- General setting (``-m slow``; B = 2 of 4 nodes, staleness up to 4: which updates meet
  in a buffer depends on arrival times): killed twice, it reaches its target version
  count and ends within ``ACCURACY_TOLERANCE`` of an uninterrupted run's accuracy. The
  tolerance comes from the spread of uninterrupted runs of that scenario (README, "Kill
  and resume").
"""
from __future__ import annotations

import json
import signal

import pytest
import torch

from orchestrator import checkpoint
from tests.integration.test_resume import _orchestrator, _rows


def _toml(nodes: int, buffer_size: int, max_staleness: int, rounds: int) -> str:
    return f"""name = "resume-async"
seed = 7
[model]
name = "mlp"
[data]
partition = "dirichlet"
alpha = 1.0
[training]
lr = 0.05
batch_size = 32
[federation]
mode = "async"
buffer_size = {buffer_size}
max_staleness = {max_staleness}
rounds = {rounds}
round_timeout = 30.0
lease_seconds = 3.0
[defense]
name = "mean"
[output]
live = false
plot = false
checkpoint_every = 1
[[roles]]
name = "honest"
count = {nodes}
"""


def _resumes(run_dir):
    return [json.loads(line) for line in (run_dir / "resumed.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kill_at", ["collect:2", pytest.param("aggregate:2", marks=pytest.mark.slow)])
def test_killed_deterministic_async_run_ends_on_the_uninterrupted_model(tmp_path, kill_at):
    rounds = 4
    toml = tmp_path / "s.toml"
    toml.write_text(_toml(nodes=3, buffer_size=3, max_staleness=0, rounds=rounds))
    whole = _orchestrator(toml, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    run_dir = tmp_path / "killed"
    died = _orchestrator(toml, run_dir, kill_at)  # during step 2's collection, or its defense computed
    assert died.returncode == -signal.SIGKILL, (died.returncode, died.stderr.decode()[-2000:])
    ck = checkpoint.load(run_dir / "checkpoint.pt")
    assert ck["next_round"] == 2 and ck["model_version"] == 2 and ck["async"]["version"] == 2
    done = _orchestrator(toml, run_dir)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (note,) = _resumes(run_dir)
    assert note["round"] == 2 and note["model_version"] == 2 and "async_lost" in note

    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(run_dir / "checkpoint.pt")
    assert a["model_version"] == b["model_version"] == rounds
    assert torch.equal(a["global"], b["global"]), (a["global"] - b["global"]).abs().max()
    rows, whole_rows = _rows(run_dir), _rows(tmp_path / "whole")
    assert [r["round"] for r in rows] == list(range(rounds))
    assert all(r["outcome"] == "complete" and r["staleness"] == [0, 0, 0] for r in rows)
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in whole_rows]


ACCURACY_TOLERANCE = 0.10
"""|final accuracy, killed and resumed - uninterrupted| allowed in the general setting.
Five uninterrupted runs of this scenario ended at 0.849, 0.899, 0.895, 0.865, 0.865
(range 0.050, sd 0.0215): the difference of two runs has sd ~0.030, and 0.10 is ~3.3 of
those (and twice the range). A resumed run also loses the buffered updates of the kill."""


@pytest.mark.slow  # ~2 min under load: three orchestrator starts of an 8-step run, one more uninterrupted
def test_killed_general_async_run_reaches_its_versions_within_the_measured_spread(tmp_path):
    rounds = 8
    toml = tmp_path / "s.toml"
    toml.write_text(_toml(nodes=4, buffer_size=2, max_staleness=4, rounds=rounds))
    whole = _orchestrator(toml, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    run_dir = tmp_path / "killed"
    for kill_at, next_round in (("collect:2", 2), ("between:4", 5)):
        died = _orchestrator(toml, run_dir, kill_at)
        assert died.returncode == -signal.SIGKILL, (kill_at, died.returncode, died.stderr.decode()[-2000:])
        assert checkpoint.load(run_dir / "checkpoint.pt")["next_round"] == next_round, kill_at
    done = _orchestrator(toml, run_dir)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert [n["round"] for n in _resumes(run_dir)] == [2, 5]

    b = checkpoint.load(run_dir / "checkpoint.pt")
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == list(range(rounds))
    assert all(r["outcome"] == "complete" for r in rows)
    assert b["model_version"] == rounds  # every step aggregated: the target version count
    whole_acc = _rows(tmp_path / "whole")[-1]["accuracy"]
    assert abs(rows[-1]["accuracy"] - whole_acc) <= ACCURACY_TOLERANCE, (rows[-1]["accuracy"], whole_acc)
