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

from .adversary import ByzantineSupport
from .churn import Restarter, churn_json, launch_args, restartable
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

    def snapshot(self) -> dict[str, subprocess.Popen]:
        with self._lock:
            return dict(self.procs)

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


def behaviour_json(role: RoleSection, seed: int, extra: Optional[dict] = None) -> Optional[str]:
    """The node-side behaviour of a role (attack, schedule, churn), or None for a plain honest node.
    ``extra``: what the run gives its Byzantine nodes (``ByzantineSupport.behaviour_extra``)."""
    if not (role.byzantine or role.leave_at_round >= 0 or role.dropout > 0):
        return None
    return json.dumps({"byzantine": role.byzantine, "attack": role.attack, "attack_params": role.attack_params,
                       "schedule": role.schedule, "knowledge": role.knowledge, "leave_at_round": role.leave_at_round,
                       "rejoin_at_round": role.rejoin_at_round, "dropout": role.dropout, "seed": seed,
                       **(extra or {})})


def node_argv(address: str, name: str, token: str, role: RoleSection, scenario: Scenario,
              extra: Optional[dict] = None) -> list[str]:
    argv = [sys.executable, "-m", "fednode", "--orchestrator", address, "--name", name, "--token", token]
    if scenario.data.data_dir:
        argv += ["--data-dir", scenario.data.data_dir]
    b = behaviour_json(role, scenario.seed, extra)
    if b:
        argv += ["--behaviour", b]
    c = churn_json(role, scenario.seed)
    if c:
        argv += ["--churn", c]
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
    support = ByzantineSupport(scenario, coord)
    for line in support.describe():
        console.print(line)
    if not spawn_nodes:
        console.print(f"waiting for nodes: fednode --orchestrator {address} --name <name> --token {token}")
        if support.group:
            path = support.write_behaviours(run_dir, {n: behaviour_json(r, scenario.seed, support.behaviour_extra(n, r))
                                                      for n, r in scenario.node_roles() if r.byzantine})
            console.print(f"Byzantine nodes: add --behaviour with their entry of {path}")
    if spawn_nodes:
        start = _starter(children, address, token, scenario, run_dir, support)
        late: list[tuple[str, float, str, RoleSection, str]] = []  # (round|seconds, at, name, role, process key)
        for name, role in scenario.node_roles():
            if role.join_at_round > 0:
                late.append(("round", role.join_at_round, name, role, name))
                coord.await_joiners.setdefault(role.join_at_round, set()).add(name)
            elif role.join_after_seconds > 0:
                late.append(("seconds", role.join_after_seconds, name, role, name))
            else:
                start(name, role, name)
            if role.rejoin_at_round > 0:  # same secret, so the orchestrator gives back the same node id
                late.append(("round", role.rejoin_at_round, name, role, f"{name}@rejoin"))
                coord.await_joiners.setdefault(role.rejoin_at_round, set()).add(name)
        if late:
            threading.Thread(target=_late_joiners, args=(coord, start, late), daemon=True).start()
        Restarter(children, start, dict(scenario.node_roles()), coord.shutdown).begin()
        coord.expected_at_start = sum(1 for _, r in scenario.node_roles()
                                      if r.join_at_round <= 0 and r.join_after_seconds <= 0)
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
        support.stop()
        support.write(run_dir)
    summary["run_dir"] = str(run_dir)
    console.print(summary_table(summary, str(run_dir)))
    return summary


def _starter(children: ChildProcesses, address: str, token: str, scenario: Scenario, run_dir: Path,
             support: ByzantineSupport):
    """``start(name, role, key)``: spawn one node process, tracked under ``key``. Nodes that
    rejoin get one fixed secret (in their environment, not argv) for all their processes."""
    node_secrets = {n: secrets.token_hex(16) for n, r in scenario.node_roles() if r.rejoin_at_round > 0 or restartable(r)}
    options = launch_args(scenario, run_dir)  # idle mode, training slots

    def start(name: str, role: RoleSection, key: str) -> None:
        env = {"BYZFED_NODE_SECRET": node_secrets[name]} if name in node_secrets else None
        argv = node_argv(address, name, token, role, scenario, support.behaviour_extra(name, role)) + options
        children.spawn(key, argv, run_dir / "nodes" / f"{name}.log", env)
    return start


def _late_joiners(coord: Coordinator, start, late) -> None:
    """Start nodes when their round begins (join_at_round, rejoin_at_round) or after
    their delay (join_after_seconds)."""
    t0 = time.monotonic()
    pending = list(late)
    while pending and not coord.shutdown.is_set():
        for item in list(pending):
            when, at, name, role, key = item
            if (coord.round_id >= at) if when == "round" else (time.monotonic() - t0 >= at):
                pending.remove(item)
                start(name, role, key)
        time.sleep(0.1)
