"""Many sessions on one orchestrator, scaled down (bench/sessions.py runs 10,000).

A real orchestrator (``./launch.sh run``) with a 3-node federation and 400 load sessions
(``roles.load``) held by one real load-generator process on ``grpc.aio``: every session
joins, heartbeats and long-polls; the federation completes every round; no session is
evicted, none is ever selected or handed a task. Correctness only: no timing is asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_load_sessions_hold_while_a_federation_trains(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sessions.py"), "--sessions", "400", "--procs", "1", "--channels", "4",
         "--nodes", "3", "--rounds", "4", "--lease", "12", "--max-seconds", "240", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=290)
    assert (out / "sessions.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "sessions.json").read_text())
    log = (out / "orchestrator.log").read_text(errors="replace")[-3000:]
    assert r["sessions_joined"] == 400 and r["sessions_join_failed"] == 0, (r["errors"], log)
    assert r["rounds_completed"] == 4, log
    assert r["sessions_evicted"] == 0 and r["evicted_in_metrics"] == 0, r["errors"]
    assert r["sessions_tasks"] == 0  # load sessions are never handed a task
    # every session long-polled and heartbeat (its first beat comes within a second of its join,
    # and round 0 waits for every join)
    assert r["sessions_polls_opened"] >= 400 and r["heartbeat_latency_ms_all"]["count"] >= 400
    assert not {k: v for k, v in r["errors"].items() if not k.endswith("CANCELLED")}, r["errors"]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        assert row["selected"] == 3 and all(n.startswith("honest-") for n in row["selected_nodes"])
    assert rows[0]["alive"] == 3 and rows[0]["load_sessions_alive"] == 400  # round 0 waited for every session
    assert proc.returncode == 0, proc.stdout[-2000:]
