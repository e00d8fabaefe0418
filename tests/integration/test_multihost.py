"""Two machines for real: the orchestrator and its nodes on two Linux network namespaces.

Each test creates two namespaces ("host A" and "host B") joined by a veth pair, with
addresses in a private /24 that exists only inside them. The orchestrator runs in A
(``python -m orchestrator serve ... --host 0.0.0.0``), every node in B dialling A's
address, exactly as on two machines: nothing of A is reachable from B through
127.0.0.1, so a node told to upload to a wildcard or loopback address fails.

The regression under test: the orchestrator used to advertise its *bind* address
(``0.0.0.0:PORT``) as the ingest address, so nodes on another machine uploaded to
themselves and every round was abandoned. Here the JoinReply's ingest address is
never a wildcard and the rounds complete.

Needs root and iproute2 (``ip netns``); otherwise every test is skipped with the
reason. Every process is stopped by its PID and both namespaces are deleted on
every exit path. The impaired-network test also needs the kernel's netem qdisc.
"""
from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

from orchestrator.launch import ChildProcesses

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PORT = 50051  # the namespaces have their own port space: any port is free in A
_serial = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p


class TwoHosts:
    """Namespaces ``a`` and ``b`` joined by a veth pair, each with ``lo`` up; the processes
    started in them (by PID only)."""

    def __init__(self) -> None:
        n = next(_serial)
        tag = f"{os.getpid()}-{n}"
        self.a, self.b = f"byzfed-a-{tag}", f"byzfed-b-{tag}"
        short = f"{os.getpid() % 100000}{n % 10}"  # interface names: at most 15 characters
        self.veth_a, self.veth_b = f"bzfa{short}", f"bzfb{short}"
        subnet = 1 + (os.getpid() * 10 + n) % 250
        self.addr_a, self.addr_b = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.created: list[str] = []
        self.children = ChildProcesses()
        self.logs: dict[str, Path] = {}

    def up(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
            self.created.append(ns)
        _ip("link", "add", self.veth_a, "netns", self.a, "type", "veth", "peer", "name", self.veth_b, "netns", self.b)
        for ns, dev, addr in ((self.a, self.veth_a, self.addr_a), (self.b, self.veth_b, self.addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def impair(self, spec: list[str]) -> Optional[str]:
        """``tc qdisc add dev VETH root netem SPEC`` on both ends; the error when it fails."""
        for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
            p = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *spec],
                               capture_output=True, text=True, timeout=30)
            if p.returncode != 0:
                return p.stderr.strip() or f"exit status {p.returncode}"
        return None

    def spawn(self, ns: str, name: str, argv: list[str], log_dir: Path,
              env: Optional[dict] = None) -> subprocess.Popen:
        self.logs[name] = log_dir / f"{name}.log"
        # `ip netns exec` execs the command: the PID tracked is the Python process itself
        return self.children.spawn(name, ["ip", "netns", "exec", ns, *argv], self.logs[name],
                                   {"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)

    def run_in(self, ns: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        p = self.logs.get(name)
        return p.read_text(errors="replace") if p and p.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(f"----- {n}\n{self.log(n)[-3000:]}" for n in self.logs)

    def close(self) -> None:
        """Stop every process by PID (SIGTERM, then SIGKILL), then delete the namespaces."""
        self.children.stop_all(grace=5.0)
        for ns in reversed(self.created):  # the veth pair goes with its namespaces
            _ip("netns", "del", ns, check=False)
        self.created.clear()


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    net = TwoHosts()
    try:
        try:
            net.up()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot create two network namespaces joined by a veth pair: {exc}")
        yield net
    finally:
        net.close()
        left = _ip("netns", "list", check=False).stdout
        assert net.a not in left and net.b not in left, f"namespaces left behind: {left}"


# --------------------------------------------------------------------------- the federation

SCENARIO = """\
name = "multihost"
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
round_timeout = 20.0
lease_seconds = 5.0
join_timeout = 40.0
[defense]
name = "{defense}"
f = {f}
[adversary]
collusion_timeout = 10.0
[output]
live = false
plot = false
checkpoint_every = 0
"""

PROBE = textwrap.dedent("""\
    import json, sys, time
    import grpc
    from fednode.client import FederationClient
    address, name, secret, token = sys.argv[1:5]
    end = time.monotonic() + 60
    while True:
        client = FederationClient(address)
        try:
            s = client.join(name, secret, token, timeout=2.0)
            break
        except grpc.RpcError:
            client.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.3)
    print(json.dumps({"ingest_address": s.ingest_address, "upload_address": client.upload_address}))
    client.leave("probe")
    client.close()
""")


def write_scenario(path: Path, roles: list[tuple[str, int, str]], rounds: int = 3, defense: str = "mean",
                   f: int = 0) -> Path:
    text = SCENARIO.format(rounds=rounds, defense=defense, f=f)
    for name, count, extra in roles:
        text += f'[[roles]]\nname = "{name}"\ncount = {count}\n{extra}'
    path.write_text(text)
    return path


def start_orchestrator(net: TwoHosts, scenario: Path, run_dir: Path, token: str,
                       advertise: Optional[str] = None) -> subprocess.Popen:
    argv = [PY, "-m", "orchestrator", "serve", str(scenario), "--host", "0.0.0.0", "--port", str(PORT),
            "--token", token, "--run-dir", str(run_dir)]
    if advertise:
        argv += ["--advertise-host", advertise]
    return net.spawn(net.a, "orchestrator", argv, run_dir.parent / "logs", env={"COLUMNS": "200"})  # no wrapping


def probe_join(net: TwoHosts, name: str, secret: str, token: str) -> dict:
    """From host B: join as ``name`` (then leave), return what the JoinReply advertised."""
    p = net.run_in(net.b, [PY, "-c", PROBE, f"{net.addr_a}:{PORT}", name, secret, token], timeout=90)
    assert p.returncode == 0, f"probe join failed: {p.stderr[-2000:]}\n{net.all_logs()}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def start_node(net: TwoHosts, name: str, token: str, log_dir: Path, secret: Optional[str] = None,
               behaviour: Optional[str] = None) -> subprocess.Popen:
    argv = [PY, "-m", "fednode", "--orchestrator", f"{net.addr_a}:{PORT}", "--name", name, "--token", token]
    if behaviour:
        argv += ["--behaviour", behaviour]
    return net.spawn(net.b, name, argv, log_dir, env={"BYZFED_NODE_SECRET": secret} if secret else None)


def finish(net: TwoHosts, orch: subprocess.Popen, run_dir: Path, timeout: float = 90.0) -> list[dict]:
    """The run's metrics rows once it is over (``summary.json`` written and the summary
    printed). The orchestrator then has a few seconds to exit by itself (its interpreter's
    final garbage collection alone can take several seconds on a busy machine); if it
    has not, the fixture stops it by PID."""
    end = time.monotonic() + timeout

    def over() -> bool:
        return (run_dir / "summary.json").exists() and "byzfed run summary" in net.log("orchestrator")

    while not over():
        exited = orch.poll() is not None
        if (exited or time.monotonic() > end) and not over():
            pytest.fail(f"the orchestrator {'exited with ' + str(orch.returncode) if exited else 'did not finish'} "
                        f"before the run was over (timeout {timeout}s)\n{net.all_logs()}")
        time.sleep(0.2)
    try:
        assert orch.wait(3.0) == 0, net.all_logs()
    except subprocess.TimeoutExpired:
        pass
    assert "Traceback" not in net.log("orchestrator"), net.log("orchestrator")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_honest(net: TwoHosts, tmp_path: Path, advertise: Optional[str], nodes: int = 2,
               rounds: int = 3) -> tuple[dict, list[dict], float]:
    token, secret = secrets.token_hex(8), secrets.token_hex(8)
    run_dir = tmp_path / "run"
    scenario = write_scenario(tmp_path / "multihost.toml", [("honest", nodes, "")], rounds=rounds)
    t0 = time.monotonic()
    orch = start_orchestrator(net, scenario, run_dir, token, advertise)
    for i in range(1, nodes):  # they import torch, then join (retrying until the orchestrator is up)
        start_node(net, f"honest-{i:03d}", token, tmp_path / "logs")
    joined = probe_join(net, "honest-000", secret, token)  # the real honest-000 re-joins with the same secret
    start_node(net, "honest-000", token, tmp_path / "logs", secret=secret)
    rows = finish(net, orch, run_dir)
    return joined, rows, time.monotonic() - t0


def check_rounds(net: TwoHosts, rows: list[dict], rounds: int, nodes: int) -> None:
    assert [r["outcome"] for r in rows] == ["complete"] * rounds, ([r["outcome"] for r in rows], net.all_logs())
    assert all(r["reported"] == nodes for r in rows), [r["reported"] for r in rows]


def test_nodes_on_another_host_with_a_wildcard_bind(hosts, tmp_path):
    """``--host 0.0.0.0`` and no ``--advertise-host``: the JoinReply advertises '' and the
    nodes keep the address they joined on (A's namespace address)."""
    joined, rows, took = run_honest(hosts, tmp_path, advertise=None)
    assert joined["ingest_address"] == ""  # never 0.0.0.0:PORT (the nodes would upload to themselves)
    assert joined["upload_address"] == f"{hosts.addr_a}:{PORT}"
    check_rounds(hosts, rows, 3, 2)
    accs = [r["accuracy"] for r in rows]
    assert accs[-1] > accs[0] and accs[-1] > 0.6, accs
    out = hosts.log("orchestrator")
    assert f"waiting for nodes: fednode --orchestrator <this machine's host or IP>:{PORT}" in out, out
    for i in range(2):
        assert f"uploads to {hosts.addr_a}:{PORT} (advertised '')" in hosts.log(f"honest-00{i}")
    assert "upload failed" not in hosts.all_logs()
    print(f"two hosts, wildcard bind: {len(rows)} rounds complete in {took:.1f}s, accuracy {accs}")


def test_byzantine_colluders_on_another_host_with_advertise_host(hosts, tmp_path):
    """``--advertise-host`` A: uploads and the collusion service are dialled at A's address
    (the colluders in B share their deltas through the service in A)."""
    token = secrets.token_hex(8)
    run_dir = tmp_path / "run"
    group = ["alie-000", "alie-001"]
    scenario = write_scenario(tmp_path / "multihost.toml",
                              [("honest", 2, ""), ("alie", 2, 'byzantine = true\nattack = "alie"\n')],
                              rounds=2, defense="median", f=2)
    orch = start_orchestrator(hosts, scenario, run_dir, token, advertise=hosts.addr_a)
    for i in range(2):
        start_node(hosts, f"honest-{i:03d}", token, tmp_path / "logs")
    behaviours_file = run_dir / "byzantine-behaviours.json"  # written once the orchestrator listens
    end = time.monotonic() + 20
    while not behaviours_file.exists() and time.monotonic() < end:
        time.sleep(0.1)
    behaviours = json.loads(behaviours_file.read_text())
    collusion = {json.loads(behaviours[m])["collusion"]["address"] for m in group}
    assert len(collusion) == 1 and collusion.pop().startswith(f"{hosts.addr_a}:"), behaviours
    for m in group:
        start_node(hosts, m, token, tmp_path / "logs", behaviour=behaviours[m])
    rows = finish(hosts, orch, run_dir)
    check_rounds(hosts, rows, 2, 4)
    for name in ["honest-000", "honest-001", *group]:  # what each node's JoinReply advertised, and where it uploaded
        assert f"uploads to {hosts.addr_a}:{PORT} (advertised '{hosts.addr_a}:{PORT}')" in hosts.log(name), name
    assert all(r["byzantine_selected"] == 2 for r in rows)
    record = json.loads((run_dir / "adversary.json").read_text())
    for r in ("0", "1"):
        h = record["collusion"][r]
        assert h["announced"] == group and h["posted"] == group, h
        assert sorted(h["fetches"]) == [[m, 2] for m in group], h  # each colluder got both benign deltas
    out = hosts.log("orchestrator")
    assert f"waiting for nodes: fednode --orchestrator {hosts.addr_a}:{PORT}" in out, out
    assert "upload failed" not in hosts.all_logs()


def test_rounds_complete_over_a_delayed_lossy_link(hosts, tmp_path):
    """20 ms delay and 1 % loss each way between the hosts (netem)."""
    err = hosts.impair(["delay", "20ms", "loss", "1%"])
    if err is not None:
        pytest.skip(f"tc netem is not available in this kernel/namespace: {err}")
    joined, rows, took = run_honest(hosts, tmp_path, advertise=hosts.addr_a)
    assert joined["ingest_address"] == f"{hosts.addr_a}:{PORT}"
    check_rounds(hosts, rows, 3, 2)
    print(f"two hosts, 20 ms + 1 % loss: {len(rows)} rounds complete in {took:.1f}s")
