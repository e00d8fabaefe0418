"""The launcher's side of churn: checking the churn keys of a scenario, turning a
role into the node's ``--churn`` and launch options, and restarting crashed nodes.

Node-side behaviour lives in ``fednode/churn.py`` (crashes by SIGKILL at a
phase, latency, stragglers) and ``fednode/slots.py`` (training slots). Drop-out,
graceful leave, late join and rejoin are the Byzantine-behaviour keys
(``fednode/byzantine.py``, started by ``runner.py``); this module adds:

* ``restart_after_seconds``: a node that died by a signal (a crash injected
  with ``crash_phase``, or any SIGKILL) is started again that many seconds
  later, as a new process with the node's fixed secret, so its re-join gets
  the same node id. A node that broke its upload stream is out of that round
  (one attempt per round); one that crashed before uploading may be offered the
  still-open round again, and a per-round crash decision then repeats: a device
  that keeps crashing, until the round ends.
* ``idle_nodes`` (``auto``/``light``/``warm``) and ``train_slots``: passed to
  every node the runner starts (``--idle``, ``--train-slots``, ``--slot-dir
  RUN_DIR/train-slots``), with ``--behaviour-checked`` since the scenario
  loader already checked each Byzantine role.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from .runner import ChildProcesses
    from .scenario import RoleSection, Scenario

log = logging.getLogger("orchestrator.churn")

NODE_CHURN_KEYS = ("crash_phase", "crash_probability", "crash_at_round", "latency_ms", "slowdown", "train_delay_s")
_DEFAULTS = {"crash_phase": "", "crash_probability": 0.0, "crash_at_round": -1, "latency_ms": 0.0, "slowdown": 1.0,
             "train_delay_s": 0.0}


def check_churn(s: "Scenario", need: Callable[[bool, str, str], None]) -> None:
    """Values of the churn, cross-device and async keys (called by ``scenario._validate``)."""
    fed = s.federation
    need(fed.over_selection >= 1.0, "federation.over_selection", "must be >= 1")
    need(fed.buffer_size >= 1, "federation.buffer_size", "must be >= 1")
    need(fed.max_staleness >= 0, "federation.max_staleness", "must be >= 0")
    need(fed.staleness_exponent >= 0, "federation.staleness_exponent", "must be >= 0")
    need(fed.train_slots >= 0, "federation.train_slots", "must be >= 0 (0: the machine's cores)")
    need(fed.mode != "async" or not s.adversary.omniscient, "adversary.omniscient",
         "serves a synchronous round's honest updates; it does not exist in async mode")
    if idle_mode(s) == "light":
        from fednode.strategies import lookup

        _, strategy = lookup(s.training.algorithm)
        need(not strategy.stateful, "federation.idle_nodes",
             f"is 'light' (auto: sample selection) but {s.training.algorithm!r} keeps per-node state across rounds, "
             "which a light node sheds; set idle_nodes = 'warm'")
    for i, r in enumerate(s.roles):
        key = f"roles[{i}]"
        need(0.0 <= r.crash_probability <= 1.0, f"{key}.crash_probability", "must be in [0, 1]")
        need(bool(r.crash_phase) or (r.crash_probability == 0 and r.crash_at_round < 0), f"{key}.crash_phase",
             "is needed with crash_probability or crash_at_round: 'download', 'train' or 'upload'")
        need(r.latency_ms >= 0, f"{key}.latency_ms", "must be >= 0")
        need(r.slowdown >= 1.0, f"{key}.slowdown", "must be >= 1")
        need(r.train_delay_s >= 0, f"{key}.train_delay_s", "must be >= 0")
        need(r.restart_after_seconds == -1 or r.restart_after_seconds >= 0, f"{key}.restart_after_seconds",
             "must be >= 0 (or -1: never)")


def idle_mode(s: "Scenario") -> str:
    """``light`` or ``warm`` (``auto``: light for synchronous sample selection)."""
    mode = s.federation.idle_nodes
    if mode == "auto":
        return "light" if s.federation.mode == "sync" and s.federation.selection == "sample" else "warm"
    return mode


def churn_json(role: "RoleSection", seed: int) -> Optional[str]:
    """The node's ``--churn`` JSON (``fednode.churn.ChurnSpec``), or None when the role has none."""
    spec = {k: getattr(role, k) for k in NODE_CHURN_KEYS if getattr(role, k) != _DEFAULTS[k]}
    if not spec:
        return None
    return json.dumps({**spec, "seed": seed})


def launch_args(s: "Scenario", run_dir: Path) -> list[str]:
    """Options of every node the runner starts on this machine."""
    from fednode.slots import default_slots

    slots = s.federation.train_slots or default_slots()
    return ["--idle", idle_mode(s), "--train-slots", str(slots), "--slot-dir", str(run_dir / "train-slots"),
            "--behaviour-checked"]


def restartable(role: "RoleSection") -> bool:
    return role.restart_after_seconds >= 0


class Restarter:
    """Starts crashed nodes again (``restart_after_seconds``). A node counts as crashed when
    its process died by a signal (negative return code); one that exited by itself (left,
    refused to start, shut down) is not restarted."""

    def __init__(self, children: "ChildProcesses", start: Callable[..., None], roles: dict[str, "RoleSection"],
                 stop: threading.Event, poll: float = 0.2) -> None:
        self.children = children
        self.start = start
        self.roles = {n: r for n, r in roles.items() if restartable(r)}
        self.stop = stop
        self.poll = poll
        self.restarts: dict[str, int] = {}
        self._due: dict[str, float] = {}  # name -> when to start it again
        self._handled: set[int] = set()  # pids of dead processes already scheduled

    def begin(self) -> Optional[threading.Thread]:
        if not self.roles:
            return None
        t = threading.Thread(target=self._loop, name="crash-restarter", daemon=True)
        t.start()
        return t

    def _loop(self) -> None:
        while not self.stop.wait(self.poll):
            now = time.monotonic()
            for key, proc in self.children.snapshot().items():
                name = key.split("@", 1)[0]
                if name not in self.roles or proc.pid in self._handled or proc.poll() is None or proc.returncode >= 0:
                    continue
                self._handled.add(proc.pid)
                self._due[name] = now + self.roles[name].restart_after_seconds
                log.info("%s died by signal %d; restarting in %.1fs", name, -proc.returncode,
                         self.roles[name].restart_after_seconds)
            for name, at in list(self._due.items()):
                if now >= at and not self.stop.is_set():
                    del self._due[name]
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    self.start(name, self.roles[name], name)  # replaces the dead process under the same key
