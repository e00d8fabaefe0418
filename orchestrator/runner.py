"""The experiment runner: one orchestrator in this process, one OS process per node.

Every child is tracked by PID and stopped by PID (SIGTERM, then SIGKILL) when the
run ends, fails or is interrupted; nothing is ever killed by name.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from .coordinator import Coordinator
from .progress import LiveProgress, summary_table
from .scenario import RoleSection, Scenario
from .servicer import serve


class ChildProcesses:
    """Processes this run started, stopped by PID only."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def spawn(self, name: str, argv: list[str], log_path: Path, env: Optional[dict] = None) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})
        with self._lock:
            self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with self._lock:
            proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    def stop_all(self, grace: float = 5.0) -> None:
        with self._lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def behaviour_json(role: RoleSection, seed: int) -> Optional[str]:
    """The node-side behaviour of a role (attack, schedule, churn), or None for a plain honest node."""
    if not (role.byzantine or role.leave_at_round >= 0 or role.dropout > 0):
        return None
    return json.dumps({"byzantine": role.byzantine, "attack": role.attack, "attack_params": role.attack_params,
                       "schedule": role.schedule, "leave_at_round": role.leave_at_round,
                       "dropout": role.dropout, "seed": seed})


def node_argv(address: str, name: str, token: str, role: RoleSection, scenario: Scenario) -> list[str]:
    argv = [sys.executable, "-m", "fednode", "--orchestrator", address, "--name", name, "--token", token]
    if scenario.data.data_dir:
        argv += ["--data-dir", scenario.data.data_dir]
    b = behaviour_json(role, scenario.seed)
    if b:
        argv += ["--behaviour", b]
    return argv


def make_run_dir(scenario: Scenario, root: Optional[str] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root or scenario.output.dir)
    run_dir = base / f"{scenario.name}-{stamp}"
    i = 1
    while run_dir.exists():
        run_dir = base / f"{scenario.name}-{stamp}-{i}"
        i += 1
    return run_dir


def run_scenario(scenario: Scenario, run_dir: Path, console: Optional[Console] = None,
                 spawn_nodes: bool = True, token: Optional[str] = None) -> dict[str, Any]:
    console = console or Console()
    token = token or secrets.token_hex(16)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "scenario.json").write_text(json.dumps(scenario.to_dict(), indent=2))
    children = ChildProcesses()
    live = LiveProgress(console, scenario.federation.rounds, enabled=scenario.output.live)
    coord = Coordinator(scenario, run_dir, token, on_event=live.event)
    live.coord = coord
    fed = scenario.federation
    max_workers = 2 * scenario.num_nodes + 16
    server, port = serve(coord, fed.host, fed.port, max_workers)
    address = f"{fed.host}:{port}"
    console.print(f"[bold]byzfed[/] {scenario.name}: orchestrator on {address}; {scenario.num_nodes} nodes; "
                  f"{scenario.model.name} on {scenario.data.dataset}; defense {scenario.defense.name}; "
                  f"outputs in {run_dir}")
    if not spawn_nodes:
        console.print(f"waiting for nodes: fednode --orchestrator {address} --name <name> --token {token}")
    late: list[tuple[int, str, RoleSection]] = []
    if spawn_nodes:
        for name, role in scenario.node_roles():
            if role.join_at_round > 0:
                late.append((role.join_at_round, name, role))
            else:
                children.spawn(name, node_argv(address, name, token, role, scenario), run_dir / "nodes" / f"{name}.log")
        if late:
            threading.Thread(target=_late_joiners, args=(coord, children, late, address, token, scenario, run_dir),
                             daemon=True).start()
        coord.expected_at_start = scenario.num_nodes - len(late)
    try:
        with live:
            summary = coord.run()
    except KeyboardInterrupt:
        coord.shutdown.set()
        console.print("[red]interrupted: stopping nodes[/]")
        raise
    finally:
        coord.shutdown.set()
        time.sleep(0.5 if spawn_nodes else 0)  # let nodes pick up SHUTDOWN and leave
        children.stop_all()
        server.stop(grace=1.0)
    summary["run_dir"] = str(run_dir)
    console.print(summary_table(summary, str(run_dir)))
    return summary


def _late_joiners(coord: Coordinator, children: ChildProcesses, late, address, token, scenario, run_dir) -> None:
    pending = sorted(late, key=lambda t: t[0])
    while pending and not coord.shutdown.is_set():
        while pending and coord.round_id >= pending[0][0]:
            _, name, role = pending.pop(0)
            children.spawn(name, node_argv(address, name, token, role, scenario), run_dir / "nodes" / f"{name}.log")
        time.sleep(0.1)
