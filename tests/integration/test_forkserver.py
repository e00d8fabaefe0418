"""The node fork server with real processes: nodes forked from the warm image are their
own processes (own PID, the server as parent, the node's name as process name), their
exit codes and deaths by signal reach the launcher as ``subprocess`` reports them, and
a server that dies takes its nodes with it. (Every other integration test starts its
nodes this way too; ``BYZFED_FORK_SERVER=0`` starts them as fresh processes.)"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from orchestrator.launch import ChildProcesses, ForkedProcess


def _node(*args: str) -> list[str]:
    return [sys.executable, "-m", "fednode", *args]


def _stat(pid: int) -> tuple[str, int]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    return comm, int(raw.rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie no one has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_alive(pid: int, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.02)


@pytest.fixture
def children():
    c = ChildProcesses(fork_nodes=True)
    yield c
    c.stop_all(grace=2.0)


def test_forked_nodes_exit_codes_signals_and_names(children, tmp_path):
    helped = children.spawn("help", _node("--help"), tmp_path / "help.log")
    assert isinstance(helped, ForkedProcess)
    assert helped.wait(60) == 0
    assert "usage" in (tmp_path / "help.log").read_text()

    no_token = children.spawn("bad", _node("--orchestrator", "127.0.0.1:9", "--name", "bad-000"),
                              tmp_path / "bad.log", env={"BYZFED_TOKEN": ""})
    assert no_token.wait(60) == 2
    assert "BYZFED_TOKEN" in (tmp_path / "bad.log").read_text()

    # a node whose orchestrator is not there keeps trying to join: alive until killed
    node = children.spawn("n", _node("--orchestrator", "127.0.0.1:9", "--name", "waiting-000"),
                          tmp_path / "n.log", env={"BYZFED_TOKEN": "t"})
    _wait_alive(node.pid)
    server = children.fork_server.proc.pid
    end = time.monotonic() + 10  # (the child names itself just after the fork)
    while time.monotonic() < end and _stat(node.pid)[0] != "waiting-000":
        time.sleep(0.02)
    comm, ppid = _stat(node.pid)
    assert ppid == server and node.pid not in (helped.pid, no_token.pid, server)
    assert comm == "waiting-000"
    time.sleep(0.5)
    assert node.poll() is None
    os.kill(node.pid, signal.SIGKILL)
    assert node.wait(30) == -signal.SIGKILL


def test_a_dead_fork_server_takes_its_nodes_with_it(children, tmp_path):
    node = children.spawn("n", _node("--orchestrator", "127.0.0.1:9", "--name", "orphan-000"),
                          tmp_path / "n.log", env={"BYZFED_TOKEN": "t"})
    _wait_alive(node.pid)
    server = children.fork_server.proc
    os.kill(server.pid, signal.SIGKILL)
    server.wait(30)
    end = time.monotonic() + 30
    while time.monotonic() < end and not _gone(node.pid):
        time.sleep(0.05)
    assert _gone(node.pid), "the node outlived its fork server"
    assert node.wait(5) == -signal.SIGKILL
    # the next node gets a new server
    again = children.spawn("m", _node("--help"), tmp_path / "m.log")
    assert again.wait(60) == 0 and children.fork_server.proc.pid != server.pid
