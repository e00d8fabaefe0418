"""A real federation on 127.0.0.1 for tests: the orchestrator's gRPC server and
round loop in this process (in a thread), every node its own OS process.

Every process started here is stopped by PID when the ``with`` block ends.
"""
from __future__ import annotations

import copy
import io
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.coordinator import Coordinator
from rich.console import Console

from orchestrator.launch import ChildProcesses, node_argv, node_env
from orchestrator.runner import run_scenario
from orchestrator.scenario import Scenario, from_dict
from orchestrator.servicer import serve


DEFAULT: dict[str, Any] = {"name": "test", "seed": 0, "model": {"name": "mlp"},
                           "training": {"lr": 0.05, "batch_size": 32},
                           "federation": {"rounds": 4, "round_timeout": 30.0, "lease_seconds": 3.0},
                           "output": {"live": False, "plot": False}}


def scenario(base: Optional[dict[str, Any]] = None, **sections: Any) -> Scenario:
    """A validated scenario: ``base`` (default :data:`DEFAULT`) with each given
    section merged key by key into the base's table (other values replace)."""
    raw = copy.deepcopy(DEFAULT if base is None else base)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return from_dict(raw)


def run(s: Scenario, run_dir: Path) -> tuple[dict, list[dict]]:
    """``run_scenario`` with its terminal output swallowed: the summary and the metrics rows."""
    summary = run_scenario(s, run_dir, console=Console(file=io.StringIO(), width=200))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def node_log(run_dir: Path, name: str) -> str:
    return (run_dir / "nodes" / f"{name}.log").read_text()


class Federation:
    def __init__(self, s: Scenario, run_dir: Path, spawn: Optional[list[str]] = None,
                 on_event: Optional[Callable[[str, dict], None]] = None) -> None:
        self.s = s
        self.token = secrets.token_hex(8)
        self.events: list[tuple[str, dict]] = []
        self._hook = on_event
        self.coord = Coordinator(s, run_dir, self.token, on_event=self._event)
        self.children = ChildProcesses()
        self.roles = dict(s.node_roles())
        self.spawn_names = list(self.roles) if spawn is None else spawn
        self.summary: Optional[dict] = None
        self.error: Optional[BaseException] = None

    def _event(self, kind: str, info: dict) -> None:
        self.events.append((kind, info))
        if self._hook:
            self._hook(kind, info)

    def __enter__(self) -> "Federation":
        self.server, self.port = serve(self.coord, "127.0.0.1", 0, 64)
        self.address = f"127.0.0.1:{self.port}"
        for name in self.spawn_names:
            self.start_node(name)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def start_node(self, name: str) -> None:
        self.children.spawn(name, node_argv(self.address, name, self.roles[name], self.s),
                            self.coord.run_dir / "nodes" / f"{name}.log", node_env(self.token))

    def _run(self) -> None:
        try:
            self.summary = self.coord.run()
        except BaseException as e:  # surfaced by wait()
            self.error = e

    def wait(self, timeout: float = 240.0) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run did not finish in time"
        if self.error:
            raise self.error
        return self.summary

    def wait_for(self, pred: Callable[[], bool], timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError("condition not reached in time")

    def rows(self) -> list[dict]:
        return self.coord.metrics.rows

    def __exit__(self, *exc) -> None:
        self.coord.shutdown.set()
        self.coord.keeper.notify()
        time.sleep(0.3)
        self.children.stop_all(grace=3.0)
        self.server.stop(grace=0.5)
