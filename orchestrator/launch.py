"""Launching node processes, in one place.

:class:`NodeLaunch` turns a scenario's node into a :class:`NodeProcess`: the
argv (``python -m fednode`` with the orchestrator address and name, the role's
``--behaviour`` and ``--churn`` JSON, the run's TLS files and this machine's
idle-mode and training-slot options), the environment (the federation token, as
``BYZFED_TOKEN``: never on a command line, which every user of the machine can read
in ``ps``; a fixed secret for nodes that rejoin or restart, so they get their node
id back) and the restart policy
(``restart_after_seconds``). :class:`NodeHost` starts one machine's share of
the nodes on that schedule (now, at a round, after a delay), restarts crashed
ones and reports deaths; the local runner is one node host for every node, and
each node-host rank of an ``mpirun`` job (``orchestrator/mpi.py``) is one for
its share (:func:`share`). :class:`ChildProcesses` starts descriptions and
stops them by PID only (SIGTERM, then SIGKILL); :class:`Restarter` starts a
node that died by a signal again after its role's delay.

Churn keys carried out on the node side live in ``fednode/churn.py`` (crashes
by SIGKILL at a phase, latency, stragglers) and ``fednode/slots.py`` (training
slots); drop-out, graceful leave, late join and rejoin are Byzantine-behaviour
keys (``fednode/byzantine.py``).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fednode.forkserver import death_signal
from proto.tls import ENV_CA, ENV_CERT, ENV_KEY, ClientTls

from .checks import idle_mode
from .enrolment import enrolment_for
from .scenario import RoleSection, Scenario
from .security import bundle, node_tls

log = logging.getLogger("orchestrator.launch")

NODE_CHURN_KEYS = ("crash_phase", "crash_probability", "crash_at_round", "latency_ms", "slowdown", "train_delay_s")
_DEFAULTS = {"crash_phase": "", "crash_probability": 0.0, "crash_at_round": -1, "latency_ms": 0.0, "slowdown": 1.0,
             "train_delay_s": 0.0}


@dataclass(frozen=True)
class NodeProcess:
    """One node process: what to run, in which environment, where it logs, when to restart it."""

    name: str
    key: str
    """Under which name the process is tracked (``name@rejoin`` for a second life)."""
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    log: Optional[Path] = None
    restart_after: float = -1.0
    """Seconds after a death by a signal to start it again (-1: never)."""


def behaviour_json(role: RoleSection, seed: int, extra: Optional[dict] = None) -> Optional[str]:
    """The node-side behaviour of a role (attack, schedule, churn), or None for a plain honest node.
    ``extra``: what the run gives its Byzantine nodes (``ByzantineSupport.behaviour_extra``)."""
    if not (role.byzantine or role.leave_at_round >= 0 or role.dropout > 0):
        return None
    return json.dumps({"byzantine": role.byzantine, "attack": role.attack, "attack_params": role.attack_params,
                       "schedule": role.schedule, "knowledge": role.knowledge, "leave_at_round": role.leave_at_round,
                       "rejoin_at_round": role.rejoin_at_round, "dropout": role.dropout, "seed": seed,
                       **(extra or {})})


def churn_json(role: RoleSection, seed: int) -> Optional[str]:
    """The node's ``--churn`` JSON (``fednode.churn.ChurnSpec``), or None when the role has none."""
    spec = {k: getattr(role, k) for k in NODE_CHURN_KEYS if getattr(role, k) != _DEFAULTS[k]}
    if not spec:
        return None
    return json.dumps({**spec, "seed": seed})


def launch_args(s: Scenario, run_dir: Path, slot_dir: Optional[Path] = None) -> list[str]:
    """Options of every node a launcher starts on this machine: idle mode, training slots
    (in ``slot_dir``, default ``RUN_DIR/train-slots``: one folder per machine), and
    ``--behaviour-checked`` (the scenario loader already checked each Byzantine role)."""
    from fednode.slots import default_slots

    slots = s.federation.train_slots or default_slots()
    return ["--idle", idle_mode(s), "--train-slots", str(slots),
            "--slot-dir", str(slot_dir or run_dir / "train-slots"), "--behaviour-checked"]


def restartable(role: RoleSection) -> bool:
    return role.restart_after_seconds >= 0


def node_env(token: str) -> dict[str, str]:
    """The environment that carries the federation token to a node (never its argv;
    ``fednode`` reads ``BYZFED_TOKEN``; :meth:`NodeLaunch.describe` adds the node secret,
    ``BYZFED_NODE_SECRET``: its enrolment secret with ``security.enrol``). The node's
    behaviour, secret and TLS files come from the launcher alone (:func:`node_argv`), never
    from variables this process inherited."""
    return {"BYZFED_TOKEN": token, "BYZFED_BEHAVIOUR": "", "BYZFED_NODE_SECRET": "",
            "BYZFED_NODE_SECRET_FILE": "", ENV_CA: "", ENV_CERT: "", ENV_KEY: ""}


def node_argv(address: str, name: str, role: RoleSection, scenario: Scenario,
              extra: Optional[dict] = None, tls: Optional[ClientTls] = None,
              env: Optional[dict[str, str]] = None) -> list[str]:
    """``python -m fednode`` for one node of ``scenario`` (without this machine's options).
    The token is not in it: start the process with :func:`node_env`. ``tls``: the node's
    CA (and client certificate for mutual TLS), paths only. ``env``: when given, the
    behaviour JSON (which carries the collusion and view tokens) goes into it as
    ``BYZFED_BEHAVIOUR`` instead of onto the command line."""
    argv = [sys.executable, "-m", "fednode", "--orchestrator", address, "--name", name]
    if tls is not None:
        argv += ["--tls-ca", tls.ca] + (["--tls-cert", tls.cert, "--tls-key", tls.key] if tls.cert else [])
    if scenario.data.data_dir:
        argv += ["--data-dir", scenario.data.data_dir]
    b = behaviour_json(role, scenario.seed, extra)
    if b and env is not None:
        env["BYZFED_BEHAVIOUR"] = b
    elif b:
        argv += ["--behaviour", b]
    c = churn_json(role, scenario.seed)
    if c:
        argv += ["--churn", c]
    return argv


class NodeLaunch:
    """The :class:`NodeProcess` of each node of one run, dialing ``address`` with ``token``.
    ``extra(name, role)``: what the run adds to a Byzantine node's behaviour (collusion
    service, adversary view, defense). ``slot_dir``: this machine's training-slot folder
    (:func:`launch_args`)."""

    def __init__(self, scenario: Scenario, address: str, token: str, run_dir: Path,
                 extra: Callable[[str, RoleSection], dict[str, Any]] = lambda name, role: {},
                 slot_dir: Optional[Path] = None) -> None:
        self.s, self.address, self.token, self.run_dir, self.extra = scenario, address, token, run_dir, extra
        self.roles = dict(scenario.node_roles())
        self._options = launch_args(scenario, run_dir, slot_dir)
        enrolled = enrolment_for(scenario, run_dir)  # [security] enrol: each name's secret, else random ones
        self._secrets = ({n: enrolled.secret(n) for n in self.roles} if enrolled is not None else
                         {n: secrets.token_hex(16) for n, r in self.roles.items()
                          if r.rejoin_at_round > 0 or restartable(r)})
        self._certs = bundle(scenario, run_dir)  # [security]: the run's certificate folder, None without TLS
        from fednode.strategies import lookup
        self._stateful = lookup(scenario.training.algorithm)[1].stateful  # FedDyn, FedSpeed: --state-dir

    def describe(self, name: str, key: Optional[str] = None) -> NodeProcess:
        role = self.roles[name]
        env = node_env(self.token)
        if name in self._secrets:
            env["BYZFED_NODE_SECRET"] = self._secrets[name]
        argv = node_argv(self.address, name, role, self.s, self.extra(name, role),
                         node_tls(self.s, self._certs, name), env) + self._options
        if self._stateful:  # per-node algorithm state on the node's disk: it survives a kill and resume
            argv += ["--state-dir", str(self.run_dir / "nodes" / name)]
        return NodeProcess(name, key or name, tuple(argv), env, self.run_dir / "nodes" / f"{name}.log",
                           role.restart_after_seconds)

    def schedule(self) -> tuple[list[str], list[tuple[str, float, str, str]], dict[int, set[str]]]:
        """When each node starts: ``(now, late, await_joiners)``. ``late``: ``(kind, at, name, key)``
        with kind ``round`` (join_at_round, rejoin_at_round) or ``seconds`` (join_after_seconds);
        ``await_joiners``: the names the orchestrator waits for before selecting each round."""
        now: list[str] = []
        late: list[tuple[str, float, str, str]] = []
        waits: dict[int, set[str]] = {}
        for name, role in self.roles.items():
            if role.load:  # load sessions join from a load generator (bench/sessions.py)
                continue
            if role.join_at_round > 0:
                late.append(("round", role.join_at_round, name, name))
                waits.setdefault(role.join_at_round, set()).add(name)
            elif role.join_after_seconds > 0:
                late.append(("seconds", role.join_after_seconds, name, name))
            else:
                now.append(name)
            if role.rejoin_at_round > 0:  # same secret, so the orchestrator gives back the same node id
                late.append(("round", role.rejoin_at_round, name, f"{name}@rejoin"))
                waits.setdefault(role.rejoin_at_round, set()).add(name)
        return now, late, waits


FORK_ENV = "BYZFED_FORK_SERVER"
"""``0`` starts every node as a fresh ``python -m fednode`` process instead of forking it
from the warm fork server (``fednode/forkserver.py``)."""


def _is_node(argv: list[str]) -> bool:
    return len(argv) >= 3 and argv[0] == sys.executable and argv[1:3] == ["-m", "fednode"]


class ForkedProcess:
    """A node process forked by the :class:`ForkServer`: the parts of ``subprocess.Popen``
    the launcher uses (``pid``, ``poll``, ``returncode``, ``wait``, signals). Its exit
    status comes from the server, which is its parent and reaps it."""

    def __init__(self, server: "ForkServer", pid: int, args: list[str]) -> None:
        self.server, self.pid, self.args = server, pid, args

    @property
    def returncode(self) -> Optional[int]:
        return self.server.exit_code(self.pid)

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # (never signal a PID the server has reaped: it may be reused)
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """The launcher's side of ``fednode/forkserver.py``: the server process (started on
    first use, from a thread of its own that lives as long as this object, so
    ``die_with_parent`` ties the server, and through it every node, to this process),
    the socket pair, and the exit codes the server reports."""

    def __init__(self, preexec: Optional[Callable[[], None]], log_path: Optional[Path], warm: str = "") -> None:
        import socket

        self._mine, theirs = socket.socketpair()
        self._codes: dict[int, int] = {}
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next = 0
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        self.proc: Optional[subprocess.Popen] = None
        started = threading.Event()
        failure: list[BaseException] = []

        def hold() -> None:  # the thread that starts the server lives until close()
            try:
                out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
                try:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "fednode.forkserver", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec,
                        env={**os.environ, "BYZFED_FORK_WARM": warm})
                finally:
                    if log_path is not None:
                        out.close()
            except BaseException as e:
                failure.append(e)
            finally:
                theirs.close()
                started.set()
            self.closed.wait()

        threading.Thread(target=hold, name="fork-server", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]
        self._buf = b""
        hello = self._read_one(timeout=120.0)
        if hello is None or "ready" not in hello:
            self.close()
            raise RuntimeError(f"the node fork server did not start (its log: {log_path})")
        threading.Thread(target=self._reader, name="fork-server-reader", daemon=True).start()

    def _read_one(self, timeout: float) -> Optional[dict]:
        self._mine.settimeout(timeout)
        try:
            while b"\n" not in self._buf:
                data = self._mine.recv(1 << 16)
                if not data:
                    return None
                self._buf += data
        except OSError:
            return None
        finally:
            self._mine.settimeout(None)
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _reader(self) -> None:
        while True:
            msg = self._read_one(timeout=None)
            with self._cond:
                if msg is None:  # the server is gone: its children were SIGKILLed with it
                    self.closed.set()
                    self._cond.notify_all()
                    return
                if "exit" in msg:
                    self._codes[int(msg["exit"])] = int(msg["code"])
                else:
                    self._replies[int(msg["id"])] = msg
                self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self.closed.is_set() and self.proc is not None and self.proc.poll() is None

    def exit_code(self, pid: int) -> Optional[int]:
        with self._cond:
            code = self._codes.get(pid)
            if code is None and self.closed.is_set():
                return -signal.SIGKILL
            return code

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Optional[Path],
              cwd: Optional[Path]) -> ForkedProcess:
        with self._cond:
            self._next += 1
            rid = self._next
        req = {"id": rid, "argv": argv[3:], "env": env, "log": str(log_path) if log_path else "",
               "cwd": str(cwd) if cwd else ""}
        with self._send_lock:
            self._mine.sendall(json.dumps(req).encode() + b"\n")
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._replies or self.closed.is_set(), timeout=60.0) \
                    or rid not in self._replies:
                raise RuntimeError("the node fork server did not answer")
            reply = self._replies.pop(rid)
        if "error" in reply:
            raise OSError(f"the node fork server could not fork: {reply['error']}")
        return ForkedProcess(self, int(reply["pid"]), argv)

    def close(self, grace: float = 5.0) -> None:
        """Stop the server by its PID (after its nodes: see ChildProcesses.stop_all)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        try:
            self._mine.close()
        except OSError:
            pass
        self.closed.set()


class ChildProcesses:
    """Processes this launcher started, stopped by PID only. ``die_with_parent``: each child
    is SIGKILLed by the kernel if this process dies (node hosts of an ``mpirun`` job: a host
    killed takes its nodes with it). The signal comes when the *thread* that started the
    child ends, so children must be started from threads that live until :meth:`stop_all`."""

    def __init__(self, die_with_parent: bool = False, fork_nodes: Optional[bool] = None) -> None:
        self._preexec = death_signal() if die_with_parent else None
        self.procs: dict[str, subprocess.Popen | ForkedProcess] = {}
        self.described: dict[str, NodeProcess] = {}
        self._lock = threading.Lock()
        self.fork_nodes = os.environ.get(FORK_ENV, "1") != "0" if fork_nodes is None else fork_nodes
        """Start ``python -m fednode`` processes by forking them from the warm fork server."""
        self.fork_server: Optional[ForkServer] = None
        self._fork_lock = threading.Lock()
        self.fork_warm = ""
        """The dataset arguments (JSON) the fork server loads before it forks (see
        ``fednode/forkserver.py``); set by the :class:`NodeHost` that owns these children."""

    def _forker(self, log_path: Optional[Path]) -> Optional[ForkServer]:
        with self._fork_lock:
            if self.fork_server is None or not self.fork_server.alive:
                if self.fork_server is not None:
                    log.warning("the node fork server ended; starting another")
                where = None if log_path is None else log_path.parent / "forkserver.log"
                self.fork_server = ForkServer(self._preexec, where, self.fork_warm)
            return self.fork_server

    def start(self, proc: NodeProcess) -> subprocess.Popen | ForkedProcess:
        return self.spawn(proc.key, list(proc.argv), proc.log, proc.env, proc)

    def spawn(self, name: str, argv: list[str], log_path: Optional[Path], env: Optional[dict] = None,
              described: Optional[NodeProcess] = None, cwd: Optional[Path] = None) -> subprocess.Popen | ForkedProcess:
        out = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.fork_nodes and _is_node(argv):
            proc = self._forker(log_path).spawn(argv, {**os.environ, **(env or {})}, log_path, cwd)
        else:
            if log_path is not None:
                out = open(log_path, "ab")
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})}, cwd=cwd, preexec_fn=self._preexec)
            finally:
                if log_path is not None:
                    out.close()
        with self._lock:
            self.procs[name] = proc
            if described is not None:
                self.described[name] = described
        return proc

    def snapshot(self) -> dict[str, subprocess.Popen | ForkedProcess]:
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
        with self._fork_lock:
            if self.fork_server is not None:
                self.fork_server.close(grace)


class Restarter:
    """Starts crashed nodes again (their description's ``restart_after``). A node counts as
    crashed when its process died by a signal (negative return code); one that exited by
    itself (left, refused to start, shut down) is not restarted. A node that broke its
    upload stream is out of that round (one attempt per round); one that crashed before
    uploading may be offered the still-open round again, and a per-round crash decision then
    repeats: a device that keeps crashing, until the round ends."""

    def __init__(self, children: ChildProcesses, start: Callable[[str, str], None], stop: threading.Event,
                 poll: float = 0.2) -> None:
        self.children = children
        self.start = start  # start(name, key)
        self.stop = stop
        self.poll = poll
        self.restarts: dict[str, int] = {}
        self._due: dict[str, tuple[float, str]] = {}  # name -> (when, key)
        self._handled: set[int] = set()  # pids of dead processes already scheduled

    def begin(self) -> threading.Thread:
        t = threading.Thread(target=self._loop, name="crash-restarter", daemon=True)
        t.start()
        return t

    def _loop(self) -> None:
        while not self.stop.wait(self.poll):
            now = time.monotonic()
            described = self.children.described
            for key, proc in self.children.snapshot().items():
                d = described.get(key)
                if d is None or d.restart_after < 0 or proc.pid in self._handled or proc.poll() is None \
                        or proc.returncode >= 0:
                    continue
                self._handled.add(proc.pid)
                self._due[d.name] = (now + d.restart_after, key)
                log.info("%s died by signal %d; restarting in %.1fs", d.name, -proc.returncode, d.restart_after)
            for name, (at, key) in list(self._due.items()):
                if now >= at and not self.stop.is_set():
                    del self._due[name]
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    self.start(name, key)  # replaces the dead process under the same key


def share(names: list[str], hosts: int, index: int) -> list[str]:
    """Node host ``index``'s share of ``names`` among ``hosts`` node hosts: every ``hosts``-th
    name from position ``index`` (a deterministic, balanced split: sizes differ by at most one,
    and each role's nodes spread over the hosts)."""
    if hosts < 1 or not 0 <= index < hosts:
        raise ValueError(f"node host {index} of {hosts}: need 0 <= index < hosts")
    return names[index::hosts]


class NodeHost:
    """One machine's share of a run's nodes: starts ``names`` on the schedule of
    :meth:`NodeLaunch.schedule` (now; when ``current_round()`` reaches a node's
    join_at_round / rejoin_at_round; join_after_seconds after :meth:`begin`), restarts
    crashed ones (:class:`Restarter`) and logs every death. The local runner runs one for
    every node with the orchestrator's round; an ``mpirun`` node host runs one for its share
    with the round rank 0 tells it. Threads end when ``stop`` is set; :meth:`stop_all`
    then stops the children by PID."""

    def __init__(self, launch: NodeLaunch, names: list[str], current_round: Callable[[], int],
                 stop: threading.Event, children: Optional[ChildProcesses] = None) -> None:
        self.launch = launch
        self.children = children or ChildProcesses()
        d = launch.s.data
        self.children.fork_warm = json.dumps({"dataset": d.dataset, "data_dir": d.data_dir,
                                              "test_fraction": d.test_fraction, "seed": launch.s.seed,
                                              "model": launch.s.model.name})
        self.current_round = current_round
        self.stop = stop
        mine = set(names)
        now, late, _ = launch.schedule()
        self.now = [n for n in now if n in mine]
        self.late = [item for item in late if item[2] in mine]
        self.restarter = Restarter(self.children, self.start, stop)
        self.exits: list[tuple[str, int, int]] = []
        """``(key, pid, returncode)`` of every child that ended while the run went on."""

    def start(self, name: str, key: str) -> subprocess.Popen | ForkedProcess:
        proc = self.children.start(self.launch.describe(name, key))
        log.info("started %s (pid %d)", key, proc.pid)
        return proc

    def begin(self) -> None:
        for name in self.now:
            self.start(name, name)
        threading.Thread(target=self._late_joiners, name="late-joiners", daemon=True).start()
        self.restarter.begin()

    def _late_joiners(self) -> None:
        """Start nodes when their round begins or after their delay; lives until ``stop``
        (children die with the thread that started them where ``die_with_parent`` is on)."""
        t0 = time.monotonic()
        pending = list(self.late)
        while not self.stop.is_set():
            for item in list(pending):
                when, at, name, key = item
                if (self.current_round() >= at) if when == "round" else (time.monotonic() - t0 >= at):
                    pending.remove(item)
                    self.start(name, key)
            self.stop.wait(0.1)

    def watch(self, stopping: bool = False) -> list[tuple[str, int, int]]:
        """Record and log the children that ended since the last call: ``(key, pid, returncode)``
        (``stopping``: this host is stopping them; no warning)."""
        seen = {pid for _, pid, _ in self.exits}
        ended = [(key, p.pid, p.returncode) for key, p in self.children.snapshot().items()
                 if p.pid not in seen and p.poll() is not None]
        for key, pid, rc in ended:
            if stopping:
                log.info("%s (pid %d) ended with status %d", key, pid, rc)
            elif rc < 0:
                log.warning("%s (pid %d) died by signal %d", key, pid, -rc)
            else:
                log.info("%s (pid %d) exited with status %d", key, pid, rc)
        self.exits += ended
        return ended

    def stop_all(self, leave: float = 0.0, grace: float = 5.0) -> None:
        """Stop starting and restarting; give the children ``leave`` seconds to leave by
        themselves (the orchestrator told them SHUTDOWN), then SIGTERM, then SIGKILL by PID."""
        self.stop.set()
        end = time.monotonic() + leave
        while time.monotonic() < end and any(p.poll() is None for p in self.children.snapshot().values()):
            self.watch()
            time.sleep(0.05)
        self.watch()
        self.children.stop_all(grace)
        self.watch(stopping=True)
