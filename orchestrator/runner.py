"""The experiment runner: one orchestrator in this process, one OS process per node.

Node processes are described by ``launch.NodeLaunch`` and started by
``launch.NodeHost`` (here, or on the node-host ranks of an ``mpirun`` job:
``orchestrator/mpi.py``); every child is tracked by PID and stopped by PID
(SIGTERM, then SIGKILL) when the run ends, fails or is interrupted; nothing is
ever killed by name.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

from rich.console import Console

from .adversary import ByzantineSupport
from .coordinator import Coordinator
from .labels import override_tag
from .launch import ChildProcesses, NodeHost, NodeLaunch, behaviour_json
from .progress import LiveProgress, summary_table
from .scenario import Scenario
from .servicer import serve

if TYPE_CHECKING:
    from .group import GroupSpec


def make_run_dir(scenario: Scenario, root: Optional[str] = None, overrides: Sequence[str] = ()) -> Path:
    """``ROOT/<name>[__<overrides>]-<timestamp>``: the ``--set`` values a run was given name
    its folder (``attack-signflip__name=median__f=3-20261201-231500``), so runs of one
    scenario with different values stay apart (:func:`labels.override_tag`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root or scenario.output.dir)
    tag = override_tag(overrides)
    stem = f"{scenario.name}__{tag}" if tag else scenario.name
    run_dir = base / f"{stem}-{stamp}"
    i = 1
    while run_dir.exists():
        run_dir = base / f"{stem}-{stamp}-{i}"
        i += 1
    return run_dir


class NodeHosts(Protocol):
    """Where a run's nodes are started when not by this process: the node-host ranks of an
    ``mpirun`` job (``orchestrator.mpi.RemoteHosts``). :func:`run_scenario` calls
    :meth:`begin` once the orchestrator listens (with the address nodes dial and what each
    Byzantine node is given) and :meth:`end` when the run is over."""

    def begin(self, coord: Coordinator, launch: NodeLaunch) -> None: ...

    def end(self) -> None: ...


def run_scenario(scenario: Scenario, run_dir: Path, console: Optional[Console] = None,
                 spawn_nodes: bool = True, token: Optional[str] = None, *,
                 group: Optional["GroupSpec"] = None, hosts: Optional[NodeHosts] = None) -> dict[str, Any]:
    """Run ``scenario`` to its end; its outputs go to ``run_dir``.

    Nodes: ``spawn_nodes`` (``run``): this process is the node host of every node;
    ``hosts``: node hosts elsewhere start them (rank 0 of an ``mpirun`` job, which starts
    none itself); neither (``serve``): nodes join by themselves. In the first two cases the
    orchestrator knows the schedule (who starts now, who joins at which round) from the
    same :meth:`NodeLaunch.schedule`. ``group``: this process is rank 0 of an aggregation
    group of ``group.world`` ranks (``orchestrator.group``); None: one rank."""
    console = console or Console()
    token = token or secrets.token_hex(16)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "scenario.json").write_text(json.dumps(scenario.to_dict(), indent=2))
    live = LiveProgress(console, scenario.federation.rounds, enabled=scenario.output.live)
    fed = scenario.federation
    max_workers = 2 * scenario.num_nodes + 16
    ranks: Optional[ChildProcesses] = None
    if group is None and scenario.aggregation.ranks > 1:  # the other aggregation ranks, on this machine
        from .group import start_local_ranks
        ranks = ChildProcesses()
        group = start_local_ranks(run_dir / "scenario.json", run_dir, scenario.aggregation.ranks, ranks.spawn)
    try:
        coord, server, port = _start(scenario, run_dir, token, live.event, group,
                                     lambda c: serve(c, fed.host, fed.port, max_workers))
    except BaseException:
        if ranks is not None:
            ranks.stop_all(grace=1.0)
        raise
    live.coord = coord
    address = f"{fed.host}:{port}"
    console.print(f"[bold]byzfed[/] {scenario.name}: orchestrator on {address}; {scenario.num_nodes} nodes; "
                  f"{scenario.model.name} on {scenario.data.dataset}; defense {scenario.defense.name}; "
                  f"outputs in {run_dir}")
    support = ByzantineSupport(scenario, coord)
    for line in support.describe():
        console.print(line)
    local: Optional[NodeHost] = None
    if not spawn_nodes and hosts is None:
        reach = coord.ingest_address or f"<this machine's host or IP>:{port}"  # never the wildcard bind address
        token_file = run_dir / "federation.token"  # (never printed: a console is often logged or shared)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        tls_hint = " --tls-ca <the run's ca.pem>" if scenario.security.enabled else ""
        if scenario.security.enrol:
            from .enrolment import folder_of
            tls_hint += f" --secret-file {folder_of(scenario, run_dir)}/<name>.secret"
        console.print(f"waiting for nodes: fednode --orchestrator {reach} --name <name> --token-file {token_file}"
                      f"{tls_hint}  (copy the token file to each node's machine, mode 0600)")
        if support.group:
            path = support.write_behaviours(run_dir, {n: behaviour_json(r, scenario.seed, support.behaviour_extra(n, r))
                                                      for n, r in scenario.node_roles() if r.byzantine})
            console.print(f"Byzantine nodes: add --behaviour with their entry of {path}")
    else:
        dial = (coord.ingest_address or address) if hosts is not None else address  # other machines: the advertised one
        launch = NodeLaunch(scenario, dial, token, run_dir, support.behaviour_extra)
        expect_schedule(coord, launch)
        if hosts is not None:
            hosts.begin(coord, launch)
        else:
            local = NodeHost(launch, list(launch.roles), lambda: coord.round_id, coord.shutdown)
            local.begin()
    try:
        with live:
            summary = coord.run()
    except KeyboardInterrupt:
        coord.shutdown.set()
        console.print("[red]interrupted: stopping nodes[/]")
        raise
    finally:
        coord.shutdown.set()
        time.sleep(0.5 if (local or hosts) else 0)  # let nodes pick up SHUTDOWN and leave
        if local is not None:
            local.stop_all()
        if hosts is not None:
            hosts.end()
        server.stop(grace=1.0)
        if ranks is not None:  # (they end by themselves at the leader's STOP; by PID if not)
            ranks.stop_all(grace=10.0)
        support.stop()
        support.write(run_dir)
    summary["run_dir"] = str(run_dir)
    console.print(summary_table(summary, str(run_dir)))
    return summary


def expect_schedule(coord: Coordinator, launch: NodeLaunch) -> None:
    """Tell the orchestrator whom the node hosts start when: it waits for the nodes that start
    now before round 0, and for each round's late joiners before selecting that round."""
    now, _, waits = launch.schedule()
    for r, names in waits.items():
        coord.await_joiners.setdefault(r, set()).update(names)
    coord.expected_at_start = len(now)


def _start(scenario: Scenario, run_dir: Path, token: str, on_event, group: Optional["GroupSpec"],
           serve_coordinator) -> tuple[Coordinator, Any, int]:
    """The coordinator and its listening server: alone, or as rank 0 of the aggregation
    group ``group`` (``orchestrator.group.lead`` forms the group first)."""
    if group is None or group.world == 1:
        coord = Coordinator(scenario, run_dir, token, on_event=on_event)
        return (coord, *serve_coordinator(coord))
    from .group import lead

    return lead(scenario, group, lambda **kw: Coordinator(scenario, run_dir, token, on_event=on_event, **kw),
                serve_coordinator)
