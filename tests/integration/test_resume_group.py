"""Kill and resume with an aggregation group of two ranks (``aggregation.ranks = 2``,
the local launcher: rank 1 a child of rank 0, real gloo group over 127.0.0.1).

- The leader (rank 0) SIGKILLs itself during collection (``BYZFED_KILL_AT=collect:2``,
  ``BYZFED_KILL_RANK=0``: round 2's first upload to rank 0 in); rank 1 and the nodes die
  with it. Started again on the same ``--run-dir`` it re-forms the group with a fresh
  rank 1, the nodes join again by themselves, and the run ends on the uninterrupted
  W = 2 run's model bit for bit (which is the W = 1 model, ``test_group.py``).
- ``-m slow``: rank 1 SIGKILLs itself during collection (``BYZFED_KILL_RANK=1``). The
  leader survives it as ``test_group.py`` shows for an outside kill: the group re-forms
  with rank 0 alone, round 2's first attempt is recorded as abandoned with the reason,
  the nodes of rank 1 re-join rank 0, and round 2 runs again (``aggregation.rerun_rounds``:
  same model, selection and seeds; every node trains it again). The run ends on the
  uninterrupted W = 2 run's model bit for bit, with the same accuracy round by round.
"""
from __future__ import annotations

import signal

import pytest
import torch

from orchestrator import checkpoint
from tests.integration.test_resume import _orchestrator, _rows

ROUNDS = 4
TOML = f"""name = "resume-group"
seed = 2
[model]
name = "mlp"
[training]
lr = 0.05
batch_size = 32
[federation]
rounds = {ROUNDS}
round_timeout = 30.0
lease_seconds = 3.0
[aggregation]
ranks = 2
timeout_seconds = 30.0
[defense]
name = "median"
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


def test_killed_leader_resumes_to_the_uninterrupted_w2_model(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(TOML)
    whole = _orchestrator(toml, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    run_dir = tmp_path / "killed"
    died = _orchestrator(toml, run_dir, "collect:2", kill_rank="0")
    assert died.returncode == -signal.SIGKILL, (died.returncode, died.stderr.decode()[-2000:])
    assert checkpoint.load(run_dir / "checkpoint.pt")["next_round"] == 2
    done = _orchestrator(toml, run_dir)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(run_dir / "checkpoint.pt")
    assert a["model_version"] == b["model_version"] == ROUNDS
    assert torch.equal(a["global"], b["global"]), (a["global"] - b["global"]).abs().max()
    rows, whole_rows = _rows(run_dir), _rows(tmp_path / "whole")
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    assert all(r["outcome"] == "complete" and r["reported"] == 4 for r in rows)
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in whole_rows]


@pytest.mark.slow  # ~1 min under load
def test_killed_non_leader_rank_reruns_its_round_and_ends_on_the_uninterrupted_model(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(TOML)
    whole = _orchestrator(toml, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]
    run_dir = tmp_path / "run"
    proc = _orchestrator(toml, run_dir, "collect:2", kill_rank="1")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    rows, whole_rows = _rows(run_dir), _rows(tmp_path / "whole")
    assert [r["round"] for r in rows] == [0, 1, 2, 2, 3]
    assert rows[2]["outcome"].startswith("abandoned: aggregation rank(s) [1] failed"), rows[2]["outcome"]
    assert rows[2]["outcome"].endswith("the round runs again") and rows[2]["attempt"] == 0
    done = rows[:2] + rows[3:]
    assert all(r["outcome"] == "complete" and r["reported"] == 4 for r in done), [r["outcome"] for r in done]
    assert [r["accuracy"] for r in done] == [r["accuracy"] for r in whole_rows]
    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(run_dir / "checkpoint.pt")
    assert a["model_version"] == b["model_version"] == ROUNDS
    assert torch.equal(a["global"], b["global"]), (a["global"] - b["global"]).abs().max()
