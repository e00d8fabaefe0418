"""Node-side churn: the spec, crash decisions, training slots, a torch-free idle path,
and the scenario keys that drive them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fednode.churn import Churn, ChurnError, ChurnSpec
from fednode.slots import TrainSlots
from orchestrator.checks import idle_mode
from orchestrator.launch import churn_json, launch_args
from orchestrator.scenario import ScenarioError, from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_spec_is_checked():
    with pytest.raises(ChurnError, match="crash_phase"):
        ChurnSpec(crash_phase="sleep")
    with pytest.raises(ChurnError, match="need crash_phase"):
        ChurnSpec(crash_probability=0.5)
    with pytest.raises(ChurnError, match="keys among"):
        ChurnSpec.from_json('{"crash_phse": "upload"}')
    with pytest.raises(ChurnError, match="slowdown"):
        ChurnSpec(slowdown=0.5)


def test_crash_decisions_are_seeded_per_round_and_node():
    c = Churn(ChurnSpec(crash_phase="upload", crash_probability=0.3, seed=1), "n-000")
    draws = [c.crashes_in(r, "upload") for r in range(400)]
    assert draws == [c.crashes_in(r, "upload") for r in range(400)]  # same in any process
    assert 0.2 < sum(draws) / 400 < 0.4
    assert not any(c.crashes_in(r, "train") for r in range(50))  # another phase
    other = Churn(ChurnSpec(crash_phase="upload", crash_probability=0.3, seed=1), "n-001")
    assert draws != [other.crashes_in(r, "upload") for r in range(400)]
    at = Churn(ChurnSpec(crash_phase="download", crash_at_round=3), "x")
    assert [r for r in range(10) if at.crashes_in(r, "download")] == [3]


def test_mid_upload_crash_plan_sends_part_of_a_multi_chunk_stream():
    c = Churn(ChurnSpec(crash_phase="upload", crash_at_round=2), "x")
    assert c.upload_plan(1, 636_040, 1 << 20) is None
    chunk, send = c.upload_plan(2, 636_040, 1 << 20)
    total = -(-636_040 // chunk)
    assert chunk % 4 == 0 and total >= 4 and 1 <= send < total


def test_crash_point_really_sigkills_the_process():
    code = ("from fednode.churn import Churn, ChurnSpec\n"
            "Churn(ChurnSpec(crash_phase='train', crash_at_round=1), 'x').crash_point('train', 0)\n"
            "print('survived round 0', flush=True)\n"
            "Churn(ChurnSpec(crash_phase='train', crash_at_round=1), 'x').crash_point('train', 1)\n"
            "print('survived round 1', flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == -signal.SIGKILL and "survived round 0" in p.stdout and "round 1" not in p.stdout


def test_training_slots_bound_concurrency_across_holders(tmp_path):
    slots_dir = tmp_path / "slots"
    inside, peak, lock = [0], [0], threading.Lock()

    def work():
        with TrainSlots(slots_dir, 2).hold():  # each thread opens its own lock files, like a process
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] == 2


def test_a_killed_holder_releases_its_slot(tmp_path):
    code = (f"from fednode.slots import TrainSlots\nimport time\n"
            f"with TrainSlots({str(tmp_path)!r}, 1).hold():\n    print('held', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        got = []
        t = threading.Thread(target=lambda: got.append(TrainSlots(tmp_path, 1).hold().__enter__()))
        t.start()
        t.join(0.5)
        assert not got  # blocked while the other process holds the only slot
        os.kill(p.pid, signal.SIGKILL)
        t.join(10)
        assert got
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()


def test_the_idle_path_does_not_import_torch():
    code = ("import sys\n"
            "import fednode.__main__, fednode.node, fednode.client, fednode.churn, fednode.slots\n"
            "from proto import codec, layout\n"
            "from fednode.node import DeferredBehaviour\n"
            "b = DeferredBehaviour('{\"byzantine\": true, \"attack\": \"sign_flip\", \"leave_at_round\": 5}', 'x')\n"
            "from fednode.client import Task\n"
            "assert b.keep_going(None, Task('wait', round=2))\n"
            "print('torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def _scenario(**federation):
    return from_dict({"federation": {"selection": "sample", "sample_size": 2, **federation},
                      "roles": [{"name": "flaky", "count": 2, "crash_phase": "upload", "crash_probability": 0.5,
                                 "restart_after_seconds": 1.0, "latency_ms": 20.0}]})


def test_scenario_churn_keys(tmp_path):
    s = _scenario()
    assert idle_mode(s) == "light" and idle_mode(_scenario(selection="all")) == "warm"
    assert idle_mode(_scenario(mode="async")) == "warm"
    spec = ChurnSpec.from_json(churn_json(s.roles[0], s.seed))
    assert spec.crash_phase == "upload" and spec.latency_ms == 20.0
    args = launch_args(s, tmp_path)
    assert args[:2] == ["--idle", "light"] and "--train-slots" in args and "--behaviour-checked" in args
    with pytest.raises(ScenarioError, match="crash_phase"):
        from_dict({"roles": [{"name": "x", "crash_probability": 0.2}]})
    with pytest.raises(ScenarioError, match="over_selection"):
        _scenario(over_selection=0.5)
    with pytest.raises(ScenarioError, match="idle_nodes"):
        from_dict({"training": {"algorithm": "feddyn"}, "federation": {"selection": "sample", "sample_size": 2}})
    from_dict({"training": {"algorithm": "feddyn"},
               "federation": {"selection": "sample", "sample_size": 2, "idle_nodes": "warm"}})
    with pytest.raises(ScenarioError, match="allowed values"):
        _scenario(mode="semi-sync")
