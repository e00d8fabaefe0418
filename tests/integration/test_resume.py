"""Kill and resume with real processes: the orchestrator (``python -m orchestrator run``,
its node processes its children) SIGKILLs itself at a kill point
(``orchestrator/failpoints.py``), is started again on the same ``--run-dir`` and goes
on from its last checkpoint with fresh node processes; the run ends on the very model
an uninterrupted run of the same scenario ends on.

One interrupted run is killed three times, once at each point of a round:
- during collection (round 1's first upload accepted, the others still coming),
- during aggregation (round 2's defense computed, not yet applied),
- between rounds (round 3 recorded and checkpointed, round 4 not opened),
and resumed after each (the rows of the rounds killed before their end are written
again by the resumed run, once). FedSECA with server momentum keeps state across rounds
(in the checkpoint), and a Byzantine node takes part. Also: a kill between writing
a checkpoint and renaming it leaves the old checkpoint whole; a corrupt checkpoint
and another run's checkpoint are refused with a message naming the file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import checkpoint

ROUNDS = 5
TOML = f"""name = "resume"
seed = 3
[model]
name = "mlp"
[data]
partition = "dirichlet"
alpha = 1.0
[training]
lr = 0.05
batch_size = 32
[federation]
rounds = {ROUNDS}
round_timeout = 30.0
lease_seconds = 3.0
[defense]
name = "fedseca"
f = 1
params = {{ momentum = true, beta = 0.5 }}
[output]
live = false
plot = false
checkpoint_every = 1
[[roles]]
name = "honest"
count = 3
[[roles]]
name = "byz"
count = 1
byzantine = true
attack = "sign_flip"
"""


def _orchestrator(toml: Path, run_dir: Path, kill_at: str = "", kill_rank: str = "") -> subprocess.CompletedProcess:
    """``python -m orchestrator run`` in a session of its own (its node processes and
    aggregation ranks in it too; all stopped by PID at the end), killed at ``kill_at`` on
    rank ``kill_rank`` (default 0) when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("BYZFED_KILL_AT", "BYZFED_KILL_RANK")}
    if kill_at:
        env["BYZFED_KILL_AT"] = kill_at
    if kill_rank:
        env["BYZFED_KILL_RANK"] = kill_rank
    argv = [sys.executable, "-m", "orchestrator", "run", str(toml), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        # the killed orchestrator's node processes (its session) by their PIDs
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, b"", err)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and int(stat.parent.name) != sid:  # fields[3]: the session id
            pids.append(int(stat.parent.name))
    return pids


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_three_times_ends_on_the_uninterrupted_model(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(TOML)
    whole = _orchestrator(toml, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    run_dir = tmp_path / "killed"
    for kill_at, next_round in (("collect:1", 1), ("aggregate:2", 2), ("between:3", 4)):
        died = _orchestrator(toml, run_dir, kill_at)
        assert died.returncode == -signal.SIGKILL, (kill_at, died.returncode, died.stderr.decode()[-2000:])
        assert checkpoint.load(run_dir / "checkpoint.pt")["next_round"] == next_round, kill_at
    done = _orchestrator(toml, run_dir)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(run_dir / "checkpoint.pt")
    assert torch.equal(a["global"], b["global"]), (a["global"] - b["global"]).abs().max()
    assert torch.equal(a["defense_state"]["momentum"], b["defense_state"]["momentum"])
    assert a["model_version"] == b["model_version"] == ROUNDS
    # one row per round, as the uninterrupted run's; the rows of the rounds run again set aside
    rows, whole_rows = _rows(run_dir), _rows(tmp_path / "whole")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in whole_rows]


def test_a_kill_during_the_checkpoint_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"global": torch.ones(3), "next_round": 1})
    code = ("import torch, pathlib; from orchestrator import checkpoint; "
            f"checkpoint.save(pathlib.Path({str(path)!r}), {{'global': torch.zeros(3), 'next_round': 2}})")
    env = dict(os.environ, BYZFED_KILL_AT="checkpoint:1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / "checkpoint.pt.tmp").exists()  # the new one was written, not renamed
    ck = checkpoint.load(path)
    assert ck["next_round"] == 1 and torch.equal(ck["global"], torch.ones(3))


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(TOML.replace(f"rounds = {ROUNDS}", "rounds = 1"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"global": torch.ones(3), "next_round": 1})
    (run_dir / "checkpoint.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # torn
    with pytest.raises(checkpoint.CheckpointError, match="is not a readable checkpoint"):
        checkpoint.load(run_dir / "checkpoint.pt")
    torch.save({"global": torch.ones(3)}, run_dir / "checkpoint.pt")  # not ours
    with pytest.raises(checkpoint.CheckpointError, match="is not a byzfed checkpoint"):
        checkpoint.load(run_dir / "checkpoint.pt")
    ck = {"global": torch.ones(3), "next_round": 1, "seed": 4, "scenario": "resume"}
    with pytest.raises(checkpoint.CheckpointError, match="its seed is 4, this run's is 3"):
        checkpoint.check_matches(run_dir / "checkpoint.pt", ck, {"scenario": "resume", "seed": 3})
    # the command line says so and stops, the checkpoint left as it was
    checkpoint.save(run_dir / "checkpoint.pt", ck)
    before = (run_dir / "checkpoint.pt").read_bytes()
    proc = _orchestrator(toml, run_dir)
    assert proc.returncode != 0
    assert "was written by another run" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    assert (run_dir / "checkpoint.pt").read_bytes() == before
