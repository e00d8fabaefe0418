"""Kill and resume with a local algorithm that keeps per-node state (FedDyn's ``h_i``,
FedSpeed's ``g^_i``), real processes: the orchestrator SIGKILLs itself at a kill point
(``orchestrator/failpoints.py``), its node processes die with it, and the resumed run
starts fresh node processes that find their state in ``RUN_DIR/nodes/<name>/``
(``fednode --state-dir``, ``fednode/node_state.py``). The run ends on the uninterrupted
run's model bit for bit, the server's own FedDyn state included.

Killed during collection (round 1's first upload in: that node trained round 1
and saved its state of round 1, which the re-run of round 1 must not start from) and
(``-m slow``, with FedSpeed too) then between rounds (round 1 checkpointed, round 2 not
opened). Without the nodes' state files the resumed FedDyn run ends elsewhere (measured:
max |w - w_whole| = 0.055 after 3 rounds), so equality here is the state files' doing.
"""
from __future__ import annotations

import signal

import pytest
import torch

from orchestrator import checkpoint
from tests.integration.test_resume import _orchestrator, _rows

ROUNDS = 3


def _toml(algorithm: str, params: str) -> str:
    return f"""name = "resume-{algorithm}"
seed = 5
[model]
name = "mlp"
[data]
partition = "dirichlet"
alpha = 0.5
[training]
algorithm = "{algorithm}"
lr = 0.05
batch_size = 32
params = {{ {params} }}
[federation]
rounds = {ROUNDS}
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
count = 3
"""


CASES = [pytest.param("feddyn", "alpha = 0.1", ("collect:1",), id="feddyn-collect"),
         pytest.param("feddyn", "alpha = 0.1", ("collect:1", "between:1"), id="feddyn-collect-between",
                      marks=pytest.mark.slow),
         pytest.param("fedspeed", "lam = 10.0, rho = 0.05", ("collect:1", "between:1"),
                      id="fedspeed-collect-between", marks=pytest.mark.slow)]
NEXT_ROUND = {"collect:1": 1, "between:1": 2}


@pytest.mark.parametrize("algorithm,params,kills", CASES)
def test_killed_stateful_run_ends_on_the_uninterrupted_model(tmp_path, algorithm, params, kills):
    toml = tmp_path / "s.toml"
    toml.write_text(_toml(algorithm, params))
    whole = _orchestrator(toml, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    run_dir = tmp_path / "killed"
    for kill_at in kills:
        died = _orchestrator(toml, run_dir, kill_at)
        assert died.returncode == -signal.SIGKILL, (kill_at, died.returncode, died.stderr.decode()[-2000:])
        assert checkpoint.load(run_dir / "checkpoint.pt")["next_round"] == NEXT_ROUND[kill_at], kill_at
        if kill_at == "collect:1":  # the first upload's node saved its state of round 1 (not to start round 1 from)
            states = sorted(p.name for p in (run_dir / "nodes").glob("*/state-*.pt"))
            assert states.count("state-0.pt") == 3 and states.count("state-1.pt") >= 1, states
    done = _orchestrator(toml, run_dir)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(run_dir / "checkpoint.pt")
    assert torch.equal(a["global"], b["global"]), (a["global"] - b["global"]).abs().max()
    assert a["step_state"].keys() == b["step_state"].keys()
    for key in a["step_state"]:  # FedDyn's server h (FedSpeed: none)
        assert torch.equal(a["step_state"][key], b["step_state"][key]), key
    assert [r["accuracy"] for r in _rows(run_dir)] == [r["accuracy"] for r in _rows(tmp_path / "whole")]
    # each node keeps the last two rounds' state (a checkpoint after every round), the newest the last round's
    for node in sorted((run_dir / "nodes").iterdir()):
        if node.is_dir() and node.name != "train-slots":
            assert sorted(p.name for p in node.glob("state-*.pt")) == [f"state-{ROUNDS - 2}.pt",
                                                                        f"state-{ROUNDS - 1}.pt"], node
