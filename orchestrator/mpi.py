"""One ``mpirun`` runs a whole federation: ``mpirun -np N python -m orchestrator mpi SCENARIO``.

Each rank becomes one part by its number (W = ``aggregation.ranks``, N ranks in all):

* **rank 0**: the orchestrator (``runner.run_scenario`` with ``hosts=RemoteHosts``); it
  starts no node itself (give its machine a node host too: one more slot in the hostfile);
* **ranks 1 .. W-1**: the other aggregation ranks (``orchestrator.rank.follow``);
* **ranks W .. N-1**: node hosts; host ``k`` of ``H = N - W`` starts
  ``launch.share(node names, H, k)`` on its machine as child ``fednode`` processes
  (``launch.NodeHost``: schedule, late joins, restarts, as in a local run).

The rank comes from Open MPI's environment (``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` /
``_LOCAL_RANK``) or Slurm's (``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``), and
must agree with ``MPI.COMM_WORLD``. The control exchange is mpi4py over numpy buffers (int64
words, JSON as uint8 bytes), never pickle:

1. all ranks: each rank's host name and IPv4 addresses (``Allgatherv``);
2. rank 0 to all (``Bcast``): run folder, token, the orchestrator's gRPC address (bound on
   0.0.0.0 and advertised at rank 0's address on MPI's network when the ranks span hosts,
   127.0.0.1 on one host), the ``tcp://HOST:PORT`` rendezvous of the aggregation group,
   and where the aggregation ranks read its group secret (a path, never the secret: the
   launcher's ``BYZFED_GROUP_KEY`` passed by ``mpirun -x``, else ``RUN_DIR/group.key``,
   0600, made by rank 0; ``orchestrator/ranksec.py``);
3. rank 0 to each node host, once the orchestrator listens: ``BEGIN`` (the address nodes
   dial and what each Byzantine node is given: collusion service, adversary view), or an
   abort when the orchestrator could not start;
4. rank 0 to node hosts: ``[ROUND, r]`` whenever the round changes (late joiners start on
   it), then ``[STOP, 0]`` when the run is over;
5. each node host to rank 0: a JSON report (its nodes, every child's exit), kept in
   ``RUN_DIR/ranks/node-hosts.json``.

Failures. A node is a child of its node host, never an MPI rank: SIGKILLed or crashed, its
host logs it and restarts it where its role says so; the orchestrator evicts it when its
lease ends; the MPI job never sees it. A node host asked to stop (SIGTERM/SIGINT) stops its
nodes by PID, reports and exits 0, and the run goes on without them. A node host that dies
(SIGKILL) takes its nodes with it (``PR_SET_PDEATHSIG``); the run goes on only when mpirun
was given ``--enable-recovery`` (``./launch.sh mpi`` adds it), as Open MPI otherwise ends the
whole job when a rank dies or exits non-zero. A node host exits 0 when the orchestrator shut
down normally, 1 when it lost the orchestrator (unreachable for ``LOST_AFTER`` seconds) or
failed itself; rank 0's exit status is the run's (0 done, 1 failed, 2 bad scenario or job
shape, 130 interrupted), and so the job's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .addresses import host_port, is_wildcard
from .checks import _is_loopback
from .interfaces import free_port, interfaces, reachable_address
from .launch import ChildProcesses, NodeHost, NodeLaunch, share
from .scenario import Scenario

log = logging.getLogger("orchestrator.mpi")

TAG_BEGIN, TAG_CTRL, TAG_REPORT = 101, 103, 105  # JSON messages use tag (length) and tag + 1 (bytes)
ROUND, STOP = 0, 1
REPORT_WAIT = 12.0
"""Seconds rank 0 waits for the node hosts' reports after STOP (they stop their nodes first)."""
LOST_AFTER = 30.0
"""A node host gives up when the orchestrator's port refused connections this long."""
BEGIN_WAIT = 900.0
"""A node host gives up when rank 0 did not start the orchestrator in this long (it loads
the data set first, which may download it)."""


class JobError(RuntimeError):
    """The job's shape or the environment does not fit the scenario (exit status 2)."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Optional["World"]:
        """The rank as the launcher's environment states it: Open MPI first (mpirun inside a
        Slurm allocation also sets Slurm's variables, for the batch step), then Slurm."""
        for rank, size, local in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                  ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
            if rank in env and size in env:
                return cls(int(env[rank]), int(env[size]), int(env.get(local, "0")))
        return None


def role_of(rank: int, aggregation_ranks: int) -> str:
    return "orchestrator" if rank == 0 else "aggregation" if rank < aggregation_ranks else "node-host"


# --------------------------------------------------------------------------- messages (no pickle)

def _encode(obj: Any) -> np.ndarray:
    return np.frombuffer(bytearray(json.dumps(obj).encode()), dtype=np.uint8)


def _decode(buf: np.ndarray) -> Any:
    return json.loads(buf.tobytes().decode())


def allgather_json(comm, obj: Any) -> list[Any]:
    data = _encode(obj)
    sizes = np.zeros(comm.Get_size(), dtype=np.int64)
    comm.Allgather(np.array([data.size], dtype=np.int64), sizes)
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    comm.Allgatherv(data, [out, (sizes.tolist(), offsets[:-1].tolist())])
    return [_decode(out[offsets[i]:offsets[i + 1]]) for i in range(len(sizes))]


def bcast_json(comm, obj: Any = None, root: int = 0) -> Any:
    mine = comm.Get_rank() == root
    data = _encode(obj) if mine else None
    n = np.array([data.size if mine else 0], dtype=np.int64)
    comm.Bcast(n, root=root)
    buf = data if mine else np.empty(int(n[0]), dtype=np.uint8)
    comm.Bcast(buf, root=root)
    return _decode(buf)


def send_json(comm, obj: Any, dest: int, tag: int) -> list:
    """Non-blocking: the requests (mpi4py keeps their buffers alive)."""
    data = _encode(obj)
    return [comm.Isend(np.array([data.size], dtype=np.int64), dest, tag), comm.Isend(data, dest, tag + 1)]


def _wait(req, keep_waiting: Callable[[], bool], poll: float = 0.02) -> bool:
    while not req.Test():
        if not keep_waiting():
            return False
        time.sleep(poll)
    return True


def recv_json(comm, source: int, tag: int, keep_waiting: Callable[[], bool]) -> Optional[Any]:
    """The next JSON message from ``source``, or None once ``keep_waiting()`` says stop."""
    n = np.zeros(1, dtype=np.int64)
    req = comm.Irecv(n, source, tag)
    if not _wait(req, keep_waiting):
        req.Cancel()
        return None
    buf = np.empty(int(n[0]), dtype=np.uint8)
    comm.Recv(buf, source, tag + 1)
    return _decode(buf)


# --------------------------------------------------------------------------- rank 0's side

class RemoteHosts:
    """The node-host ranks, seen from rank 0 (``runner.NodeHosts``)."""

    def __init__(self, comm, ranks: list[int], run_dir: Path) -> None:
        self.comm, self.ranks, self.run_dir = comm, ranks, run_dir
        self._pending: list = []
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.begun = self.ended = False
        self.reports: dict[int, Any] = {}

    def begin(self, coord, launch: NodeLaunch) -> None:
        extras = {name: launch.extra(name, role) for name, role in launch.roles.items()}
        self._send_json({"address": launch.address, "extras": extras}, TAG_BEGIN)
        self.begun = True
        log.info("node hosts %s: dial %s", self.ranks, launch.address)
        self._thread = threading.Thread(target=self._forward, args=(coord,), name="round-forwarder", daemon=True)
        self._thread.start()

    def _send_json(self, obj: Any, tag: int) -> None:
        for dest in self.ranks:
            self._pending += send_json(self.comm, obj, dest, tag)

    def _send_ctrl(self, kind: int, value: int) -> None:
        for dest in self.ranks:
            self._pending.append(self.comm.Isend(np.array([kind, value], dtype=np.int64), dest, TAG_CTRL))
        self._pending = [r for r in self._pending if not r.Test()]

    def _forward(self, coord) -> None:
        last = None
        while not self._done.wait(0.05):
            r = coord.round_id
            if r != last:
                self._send_ctrl(ROUND, r)
                last = r

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.begun:  # the orchestrator never listened: node hosts stop waiting for it
            self._send_json({"abort": "the orchestrator did not start (see rank-0.log)"}, TAG_BEGIN)
        else:
            self._done.set()
            if self._thread is not None:
                self._thread.join()
            self._send_ctrl(STOP, 0)
        self.collect()

    def collect(self) -> None:
        """Each node host's report, waiting at most :data:`REPORT_WAIT` seconds in all."""
        sizes = {dest: np.zeros(1, dtype=np.int64) for dest in self.ranks}
        reqs = {dest: self.comm.Irecv(sizes[dest], dest, TAG_REPORT) for dest in self.ranks}
        end = time.monotonic() + REPORT_WAIT
        while reqs and time.monotonic() < end:
            for dest, req in list(reqs.items()):
                if req.Test():
                    del reqs[dest]
                    buf = np.empty(int(sizes[dest][0]), dtype=np.uint8)
                    self.comm.Recv(buf, dest, TAG_REPORT + 1)
                    self.reports[dest] = _decode(buf)
            time.sleep(0.02)
        for dest, req in reqs.items():
            req.Cancel()
            log.warning("node host rank %d sent no report (it died or is stuck)", dest)
            self.reports[dest] = None
        out = self.run_dir / "ranks" / "node-hosts.json"
        out.write_text(json.dumps({str(k): v for k, v in sorted(self.reports.items())}, indent=2) + "\n")


# --------------------------------------------------------------------------- node hosts

class OrchestratorWatch:
    """Whether the orchestrator's port still accepts connections (checked every ``every`` s)."""

    def __init__(self, address: str, every: float = 5.0, lost_after: float = LOST_AFTER) -> None:
        host, _, port = address.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.every, self.lost_after = every, lost_after
        self._next = time.monotonic() + every
        self._failing_since: Optional[float] = None

    def lost(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every
        try:
            socket.create_connection(self.target, timeout=2.0).close()
            self._failing_since = None
        except OSError:
            self._failing_since = self._failing_since or now
        return self._failing_since is not None and now - self._failing_since >= self.lost_after


def host_nodes(comm, world: World, scenario: Scenario, common: dict, index: int, count: int) -> int:
    """A node host's whole life; its exit status (see the module docstring)."""
    run_dir = Path(common["run_dir"])
    asked = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: asked.set())
    give_up = time.monotonic() + BEGIN_WAIT
    begin = recv_json(comm, 0, TAG_BEGIN, lambda: not asked.is_set() and time.monotonic() < give_up)
    if begin is None or "abort" in begin:
        why = begin["abort"] if begin else "asked to stop" if asked.is_set() else f"no orchestrator in {BEGIN_WAIT:.0f}s"
        log.warning("no run: %s", why)
        return 0 if asked.is_set() or begin else 1
    hostname = socket.gethostname()
    _all_cpus()
    launch = NodeLaunch(scenario, begin["address"], common["token"], run_dir,
                        lambda name, role: begin["extras"].get(name, {}),
                        slot_dir=run_dir / "train-slots" / hostname)  # slots are per machine
    names = share([name for name, _ in scenario.node_roles()], count, index)
    current = [0]
    host = NodeHost(launch, names, lambda: current[0], threading.Event(), ChildProcesses(die_with_parent=True))
    log.info("node host %d of %d on %s: %d nodes (%s) dialling %s", index, count, hostname, len(names),
             ", ".join(names), begin["address"])
    print(f"byzfed node host rank {world.rank} on {hostname}: {len(names)} nodes; log "
          f"{run_dir / 'ranks' / f'rank-{world.rank}.log'}", flush=True)
    watch = OrchestratorWatch(begin["address"])
    code: Optional[int] = None
    stopped = False  # by rank 0's STOP (then no receive is left posted)
    ctrl = np.zeros(2, dtype=np.int64)
    req = comm.Irecv(ctrl, 0, TAG_CTRL)
    try:
        host.begin()
        while code is None:
            if req.Test():
                kind, value = (int(v) for v in ctrl)
                if kind == ROUND:
                    current[0] = value
                    log.info("round %d", value)
                    req = comm.Irecv(ctrl, 0, TAG_CTRL)
                else:
                    code, stopped = 0, True
                    log.info("the orchestrator shut down: stopping the nodes")
            elif asked.is_set():
                code = 0
                log.warning("asked to stop: stopping this host's nodes; the run goes on without them")
            elif watch.lost():
                code = 1
                log.error("lost the orchestrator at %s (refused for %.0fs)", begin["address"], LOST_AFTER)
            else:
                time.sleep(0.05)
            host.watch()
    except Exception:  # noqa: BLE001 - logged, nodes stopped, reported
        log.error("node host failed:\n%s", traceback.format_exc())
        code = 1
    finally:
        host.stop_all(leave=3.0 if stopped else 0.0, grace=5.0)
    if not stopped:
        req.Cancel()
    report = {"rank": world.rank, "host": hostname, "nodes": names, "exit_status": code,
              "restarts": host.restarter.restarts,
              "exits": [{"node": k, "pid": pid, "returncode": rc} for k, pid, rc in host.exits]}
    for r in send_json(comm, report, 0, TAG_REPORT):
        end = time.monotonic() + REPORT_WAIT
        _wait(r, lambda: time.monotonic() < end)
    return code


def _all_cpus() -> None:
    """Undo mpirun's binding of this rank to a core or package: the node processes it starts
    inherit its CPU set, and training slots count it (``fednode.slots.default_slots``)."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError, ValueError):  # not Linux, or a cpuset forbids it: keep what we have
        pass


# --------------------------------------------------------------------------- rank 0 and the entry

class _Tee:
    """Rank 0's console: the terminal mpirun forwards, and the rank's log."""

    def __init__(self, *files) -> None:
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            f.flush()

    def isatty(self) -> bool:
        return False


def _rank_log(run_dir: Path, rank: int):
    path = run_dir / "ranks" / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", buffering=1)
    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return f


def _serving(scenario: Scenario, one_host: bool, advertise: str) -> Scenario:
    """Rank 0's federation address: as the scenario says on one host; across hosts, every
    interface (unless the scenario names a concrete non-loopback host) advertised at
    ``advertise`` (unless the scenario names an advertise host); a port chosen now when the
    scenario leaves it to the system, so the broadcast can carry the address."""
    fed = scenario.federation
    host, adv = fed.host, fed.advertise_host
    if not one_host:
        host = "0.0.0.0" if _is_loopback(fed.host) else fed.host
        adv = adv or advertise
    port = fed.port or free_port(host)
    return dataclasses.replace(scenario, federation=dataclasses.replace(fed, host=host, port=port, advertise_host=adv))


def _place_gpu(scenario: Scenario, world: World) -> None:
    """An aggregation rank takes the GPU of its local rank (several ranks on one machine)."""
    if scenario.aggregation.device == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())


def _follower():
    from .rank import follow
    return follow


def _group_module():
    try:
        from . import group
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.group":
            raise
        raise JobError("aggregation.ranks > 1 needs orchestrator.group (the multi-rank aggregation group), "
                       "which this checkout does not have") from exc
    return group


def _group_advertise(common: dict, advertise: str) -> str:
    """What an aggregation rank advertises for its ingest endpoint: '' on one machine
    (``group.GroupSpec``: it listens on the scenario's host), else its own address."""
    return "" if len(set(common["hosts"])) == 1 else advertise


def _group_key_file(run_dir: Path) -> str:
    """Rank 0: where the other aggregation ranks find the group secret. '' when the
    launcher's environment gives every rank one (``BYZFED_GROUP_KEY`` or
    ``BYZFED_GROUP_KEY_FILE``, passed by ``mpirun -x``); else a fresh one in
    ``RUN_DIR/group.key`` (0600), for ranks on this machine or a shared run folder."""
    from .ranksec import GROUP_KEY_ENV, GROUP_KEY_FILE_ENV, new_group_key, write_group_key_file

    if os.environ.get(GROUP_KEY_ENV) or os.environ.get(GROUP_KEY_FILE_ENV):
        return ""
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(write_group_key_file(run_dir / "group.key", new_group_key()))


def _group_key(common: dict, aggregation: bool) -> tuple[bytes, str]:
    """This rank's group secret (aggregation ranks; b'' for node hosts) and what went
    wrong reading it ('' when nothing)."""
    from .ranksec import GROUP_KEY_ENV, GroupKeyError, group_key_from

    if not aggregation:
        return b"", ""
    try:
        key = group_key_from(common["group_key_file"] or None)
    except GroupKeyError as e:
        return b"", (f"{e} (aggregation ranks on machines without the run folder: export {GROUP_KEY_ENV}=<64 hex "
                     f"digits> and pass mpirun -x {GROUP_KEY_ENV})")
    if not key:
        return b"", (f"no group key for the aggregation ranks: rank 0's environment has {GROUP_KEY_ENV} (or "
                     f"{GROUP_KEY_ENV}_FILE) but this rank's has neither; pass mpirun -x {GROUP_KEY_ENV} "
                     f"(or -x {GROUP_KEY_ENV}_FILE)")
    return key, ""


def lead(comm, world: World, scenario: Scenario, common: dict, advertise: str, node_hosts: list[int],
         console_file, agg=None, group_key: bytes = b"") -> int:
    """Rank 0: the orchestrator, its nodes started by ``node_hosts``."""
    from rich.console import Console

    from .runner import run_scenario

    run_dir = Path(common["run_dir"])
    console = Console(file=_Tee(sys.stdout, console_file), width=int(os.environ.get("COLUMNS", "120")))
    group = None
    if scenario.aggregation.ranks > 1:
        group = _group_module().GroupSpec(rank=0, world=scenario.aggregation.ranks, rendezvous=common["rendezvous"],
                                          advertise_host=_group_advertise(common, advertise), mpi_comm=agg,
                                          group_key=group_key)
    console.print(f"byzfed mpi: {world.size} ranks on {len(set(common['hosts']))} host(s); orchestrator "
                  f"{common['orchestrator']}; node hosts {node_hosts}"
                  + (f"; aggregation group {common['rendezvous']}" if group else ""))
    remote = RemoteHosts(comm, node_hosts, run_dir)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        run_scenario(scenario, run_dir, console=console, spawn_nodes=False, token=common["token"], group=group,
                     hosts=remote)
        code = 0
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - the job's exit status says it; the log has the traceback
        log.error("the orchestrator failed:\n%s", traceback.format_exc())
        console.print(f"[red]the orchestrator failed[/]: see {run_dir / 'ranks' / 'rank-0.log'}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    remote.end()  # no-op when run_scenario ended it
    return code


def main(scenario_path: str, overrides: list[str], out: Optional[str] = None, run_dir: Optional[str] = None,
         token: Optional[str] = None) -> int:
    """``python -m orchestrator mpi``: this rank's part of the job; its exit status."""
    from .scenario import ScenarioError, load

    try:
        scenario = load(scenario_path, overrides)
    except ScenarioError as exc:
        print(f"scenario error: {exc}", file=sys.stderr)
        return 2
    env_world = World.from_env()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        print(f"byzfed mpi needs mpi4py (pip install -e '.[mpi]'): {exc}", file=sys.stderr)
        return 2
    comm = MPI.COMM_WORLD
    world = World(comm.Get_rank(), comm.Get_size(), env_world.local_rank if env_world else 0)
    W = scenario.aggregation.ranks
    try:
        if env_world is not None and (env_world.rank, env_world.size) != (world.rank, world.size):
            raise JobError(f"the launcher's environment says rank {env_world.rank} of {env_world.size}, "
                           f"MPI says {world.rank} of {world.size}")
        if world.size <= W:
            raise JobError(f"{world.size} ranks leave no node host: aggregation.ranks = {W} needs -np >= {W + 1}")
        if W > 1:
            _group_module()
        if world.rank < W:
            from .defenses import build_defense

            build_defense(scenario.defense.name, scenario.defense.params)
    except (JobError, ValueError) as exc:  # every rank fails alike, before any exchange
        print(f"byzfed mpi rank {world.rank}: {exc}", file=sys.stderr)
        return 2
    me = {"host": socket.gethostname(), "addrs": [str(i[1].ip) for i in interfaces()]}
    ranks = allgather_json(comm, me)
    one_host = len({r["host"] for r in ranks}) == 1
    peers = [a for r in ranks if r["host"] != me["host"] for a in r["addrs"]]
    advertise = "127.0.0.1" if one_host else reachable_address(peers)
    common = None
    if world.rank == 0:
        from .runner import make_run_dir

        scenario = _serving(scenario, one_host, advertise)
        fed = scenario.federation
        dial = fed.advertise_host or ("127.0.0.1" if is_wildcard(fed.host) else fed.host)
        rendezvous = f"tcp://{host_port(advertise, free_port(advertise if one_host else '0.0.0.0'))}" if W > 1 else ""
        common = {"run_dir": str(Path(run_dir) if run_dir else make_run_dir(scenario, out, overrides)),
                  "token": token or os.environ.get("BYZFED_TOKEN") or secrets.token_hex(16),
                  "orchestrator": host_port(dial, fed.port), "rendezvous": rendezvous, "ranks": W,
                  "hosts": [r["host"] for r in ranks]}
        common["group_key_file"] = _group_key_file(Path(common["run_dir"])) if W > 1 else ""
    common = bcast_json(comm, common)
    log_file = _rank_log(Path(common["run_dir"]), world.rank)
    group_key = b""
    if W > 1:  # every rank: the aggregation ranks' group secret, never over MPI (ranksec)
        group_key, problem = _group_key(common, world.rank < W)
        problems = [p for p in allgather_json(comm, problem) if p]
        if problems:
            print(f"byzfed mpi rank {world.rank}: {problems[0]}", file=sys.stderr)
            return 2
    os.environ.pop("BYZFED_GROUP_KEY", None)  # (nothing a rank starts inherits it)
    role = role_of(world.rank, W)
    # the aggregation ranks' own communicator (the MPI gather path, aggregation.gather); collective over all ranks
    agg = comm.Split(0 if world.rank < W else MPI.UNDEFINED, world.rank)
    log.info("rank %d of %d on %s (local rank %d, pid %d): %s; advertises %s", world.rank, world.size, me["host"],
             world.local_rank, os.getpid(), role, advertise)
    if role == "orchestrator":
        _place_gpu(scenario, world)
        return lead(comm, world, scenario, common, advertise, list(range(W, world.size)), log_file, agg, group_key)
    if role == "aggregation":
        _place_gpu(scenario, world)
        return int(_follower()(scenario, Path(common["run_dir"]), world.rank, W, common["rendezvous"],
                                          _group_advertise(common, advertise), mpi_comm=agg, group_key=group_key))
    try:
        return host_nodes(comm, world, scenario, common, world.rank - W, world.size - W)
    except Exception:  # noqa: BLE001
        log.error("node host failed:\n%s", traceback.format_exc())
        return 1
