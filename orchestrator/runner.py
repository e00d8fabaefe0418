"""The experiment runner: one orchestrator in this process, one OS process per node.

Node processes are described by ``launch.NodeLaunch`` and started by
``launch.ChildProcesses``; every child is tracked by PID and stopped by PID
(SIGTERM, then SIGKILL) when the run ends, fails or is interrupted; nothing is
ever killed by name.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from .adversary import ByzantineSupport
from .coordinator import Coordinator
from .launch import ChildProcesses, NodeLaunch, Restarter, behaviour_json
from .progress import LiveProgress, summary_table
from .scenario import Scenario
from .servicer import serve


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
        reach = coord.ingest_address or f"<this machine's host or IP>:{port}"  # never the wildcard bind address
        console.print(f"waiting for nodes: fednode --orchestrator {reach} --name <name> --token {token}")
        if support.group:
            path = support.write_behaviours(run_dir, {n: behaviour_json(r, scenario.seed, support.behaviour_extra(n, r))
                                                      for n, r in scenario.node_roles() if r.byzantine})
            console.print(f"Byzantine nodes: add --behaviour with their entry of {path}")
    if spawn_nodes:
        launch = NodeLaunch(scenario, address, token, run_dir, support.behaviour_extra)
        now, late, waits = launch.schedule()
        start = lambda name, key: children.start(launch.describe(name, key))  # noqa: E731
        for name in now:
            start(name, name)
        for r, names in waits.items():
            coord.await_joiners.setdefault(r, set()).update(names)
        if late:
            threading.Thread(target=_late_joiners, args=(coord, start, late), daemon=True).start()
        Restarter(children, start, coord.shutdown).begin()
        coord.expected_at_start = len(now)
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


def _late_joiners(coord: Coordinator, start, late) -> None:
    """Start nodes when their round begins (join_at_round, rejoin_at_round) or after
    their delay (join_after_seconds)."""
    t0 = time.monotonic()
    pending = list(late)
    while pending and not coord.shutdown.is_set():
        for item in list(pending):
            when, at, name, key = item
            if (coord.round_id >= at) if when == "round" else (time.monotonic() - t0 >= at):
                pending.remove(item)
                start(name, key)
        time.sleep(0.1)
