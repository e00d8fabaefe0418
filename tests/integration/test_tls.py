"""Real federations over TLS on 127.0.0.1. The local runner with mutual TLS: its orchestrator,
node processes and the Byzantine group's collusion service, certificates made for the run
(RUN_DIR/certs); the tokens never on a node's command line or in the outputs. And
``orchestrator serve --tls`` with a node started by hand with ``--tls-ca``."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from rich.console import Console

from fednode.client import FederationClient
from orchestrator.adversary import ByzantineSupport
from orchestrator.runner import run_scenario
from proto import tls
from tests.integration.harness import scenario


class _Started(logging.Handler):
    """The node PIDs the launcher records ("started NAME (pid N)", orchestrator.launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = re.fullmatch(r"started (\S+) \(pid (\d+)\)", record.getMessage())
        if m:
            self.pids[m.group(1)] = int(m.group(2))


def test_federation_over_mutual_tls_keeps_the_token_off_command_lines(run_dir, monkeypatch):
    s = scenario(model={"name": "logreg"}, federation={"rounds": 2, "round_timeout": 30.0}, security={"mtls": True},
                 defense={"name": "median", "f": 1},
                 roles=[{"name": "honest", "count": 2},
                        {"name": "alie", "count": 2, "byzantine": True, "attack": "alie"}])
    token = "tok-" + secrets.token_hex(12)
    out = io.StringIO()
    started = _Started()
    launch_log = logging.getLogger("orchestrator.launch")
    launch_log.addHandler(started)
    launch_log.setLevel(logging.INFO)
    result: dict = {}
    extras: dict = {}  # what each Byzantine node is told (the collusion group's token among it)
    behaviour_extra = ByzantineSupport.behaviour_extra

    def recording(self, name, role):
        extras[name] = told = behaviour_extra(self, name, role)
        return told
    monkeypatch.setattr(ByzantineSupport, "behaviour_extra", recording)
    monkeypatch.setenv("BYZFED_FORK_SERVER", "0")  # each node exec'd with its own command line, to read it

    def go() -> None:
        try:
            result["summary"] = run_scenario(s, run_dir, console=Console(file=out, width=200), token=token)
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    runner = threading.Thread(target=go, daemon=True)
    runner.start()
    try:
        end = time.monotonic() + 60
        while len(started.pids) < 4 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(started.pids) == 4, started.pids
        port = int(re.search(r"orchestrator on 127\.0\.0\.1:(\d+)", out.getvalue()).group(1))
        cmdlines = {}
        for name, pid in started.pids.items():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines[name] = f.read().decode()
        # the server speaks only TLS and, with mtls, only to holders of a run certificate
        certs = run_dir / "certs"
        for client in (None, tls.ClientTls(str(certs / "ca.pem"))):
            c = FederationClient(f"127.0.0.1:{port}", tls_files=client)
            try:
                c.join("honest-000", "x", token, timeout=5)
                raise AssertionError(f"a join without a client certificate ({client}) was accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            finally:
                c.close()
        # a run certificate binds its holder to its name: honest-001's cannot join as honest-000
        other = tls.ClientTls(str(certs / "ca.pem"), str(certs / "clients" / "honest-001.pem"),
                              str(certs / "clients" / "honest-001.key"))
        c = FederationClient(f"127.0.0.1:{port}", tls_files=other)
        try:
            c.join("honest-000", "x", token, timeout=10)
            raise AssertionError("honest-001's certificate joined as honest-000")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
            assert "is not the name of the client certificate this connection presented ('honest-001')" \
                in e.details(), e.details()
        finally:
            c.close()
        runner.join(120)
        assert not runner.is_alive(), "run did not finish in time"
    finally:
        launch_log.removeHandler(started)
    if "error" in result:
        raise result["error"]
    group_token = extras["alie-000"]["collusion"]["token"]
    assert extras["alie-001"]["collusion"]["token"] == group_token
    for name, cmd in cmdlines.items():
        assert token not in cmd and "--token" not in cmd, (name, cmd)
        assert group_token not in cmd and "--behaviour\0" not in cmd, (name, cmd)  # (the collusion token)
        if "\0-m\0fednode\0" in cmd:  # (an exec'd node; one forked by the fork server shows the server's)
            assert f"--tls-cert\0{certs / 'clients' / name}.pem" in cmd, (name, cmd)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["complete"] * 2 and all(r["reported"] == 4 for r in rows), rows
    assert result["summary"]["rounds_completed"] == 2
    colluded = json.loads((run_dir / "adversary.json").read_text())["collusion"]
    assert sorted(colluded) == ["0", "1"], colluded  # the colluders met over TLS in both rounds
    assert all(h["posted"] == ["alie-000", "alie-001"] for h in colluded.values()), colluded
    # the token is in no output: console, metrics, summary, node logs, scenario.json
    assert token not in out.getvalue() and group_token not in out.getvalue()
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in ("", ".json", ".jsonl", ".log", ".txt", ".csv"):
            text = path.read_text(errors="replace")
            assert token not in text and group_token not in text, path


ROOT = Path(__file__).resolve().parents[2]
SERVE_SCENARIO = """
name = "tls-serve"
[model]
name = "logreg"
[federation]
rounds = 1
round_timeout = 30.0
[output]
live = false
plot = false
[[roles]]
name = "honest"
count = 1
"""


def test_serve_with_tls_and_a_hand_started_node(tmp_path):
    (tmp_path / "s.toml").write_text(SERVE_SCENARIO)
    run = tmp_path / "run"
    env = {**os.environ, "BYZFED_TOKEN": "tok-" + secrets.token_hex(8)}
    log = tmp_path / "orchestrator.log"
    with open(log, "wb") as out:
        orch = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", str(tmp_path / "s.toml"), "--tls",
                                 "--port", "0", "--run-dir", str(run)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(ROOT), env=env)
    node = None
    try:
        end = time.monotonic() + 60
        while not (m := re.search(r"orchestrator on 127\.0\.0\.1:(\d+)", log.read_text())) and orch.poll() is None \
                and time.monotonic() < end:
            time.sleep(0.1)
        assert m, log.read_text()
        node = subprocess.run([sys.executable, "-m", "fednode", "--orchestrator", f"127.0.0.1:{m.group(1)}",
                               "--name", "honest-000", "--tls-ca", str(run / "certs" / "ca.pem")],
                              capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=90)
        assert node.returncode == 0, node.stdout[-2000:] + node.stderr[-2000:]
        assert orch.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if orch.poll() is None:
            os.kill(orch.pid, signal.SIGKILL)
            orch.wait(5)
    assert "round 0 update sent" in node.stderr + node.stdout
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 1
