"""The client process: join, heartbeat in the background, then loop over tasks.

An idle node holds no model or dataset: both are loaded at its first task.
When the orchestrator is briefly unreachable the node retries with capped
exponential back-off and jitter (:class:`Backoff`), logging once per outage (join,
task polls) or once per round (uploads) rather than once per attempt; an upload is
retried only for transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, a CANCELLED
this node did not cause) and only until the round's deadline, a refusal never. A
round is attempted once: after its upload was sent, refused or given up the node
waits for the next round instead of training the same one again. When its lease
was lost it re-joins with the same credentials and gets its identity back.

Light idle nodes (cross-device): nothing on the idle path imports torch (join,
heartbeats and task polls need only gRPC, protobuf and numpy: ~45 MB RSS
instead of ~230 MB). torch, the model and the shard are loaded when the node is
selected, inside one of the machine's training slots (``fednode.slots``). With
``idle = "light"`` the node then sheds them after the round by re-executing
itself (same PID, same secret, hence the same node id on re-join) with
``--after-round R`` so it does not take round R's task again. State kept in
memory across rounds (FedDyn/FedSpeed corrections) does not survive that, so
stateful algorithms run with ``idle = "warm"``. With ``--state-dir`` the node keeps
that state on its disk instead, one file per round trained (``fednode.node_state``),
so it outlives the process: a node restarted after its orchestrator was killed and
resumed goes on from the state of the round the resumed run starts from.
"""
from __future__ import annotations

import json
import logging
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import grpc

from .churn import Churn, ChurnSpec
from .client import FederationClient, Task
from .slots import NoSlots, TrainSlots

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fednode")

RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
"""Transient failures: the orchestrator (or the path to it) is down, not refusing."""
REJOIN_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}
UPLOAD_GRACE_SECONDS = 1.0
"""An upload attempt may run this long past the round's deadline (the orchestrator decides
whether it still counts); a hung attempt is cut then."""
MIN_ATTEMPT_SECONDS = 1.0
EXIT_NAME_TAKEN = 3
"""Exit status of a node whose name another holder of the federation token joined under first."""
EXIT_NOT_ENROLLED = 4
"""Exit status of a node whose secret is not its name's enrolment secret (``security.enrol``)."""
EXIT_REVOKED = 5
"""Exit status of a node whose name or certificate the operator revoked (``security.revoked``)."""


def _attempt_of(task) -> tuple[int, int, int]:
    """(round, model version, attempt) of a train task: a node trains each once. The attempt
    counts the times the orchestrator ran the round again (a rank died during it)."""
    return task.round, task.model_version, int((task.train or {}).get("attempt", 0) or 0)


def revoked(e: grpc.RpcError) -> bool:
    """Whether a refused call says this node's name or certificate is revoked (the
    orchestrator's ``byzfed-refusal: revoked`` trailer on ``PERMISSION_DENIED``)."""
    if e.code() != grpc.StatusCode.PERMISSION_DENIED:
        return False
    meta = dict((k, v) for k, v in (e.trailing_metadata() or ()) if isinstance(v, str))
    return meta.get("byzfed-refusal") == "revoked"


def name_taken(e: grpc.RpcError) -> bool:
    """Whether a refused join says this node's name is held by a node with other credentials
    (the orchestrator's ``byzfed-refusal: name-taken`` trailer; older ones: its message)."""
    if e.code() != grpc.StatusCode.UNAUTHENTICATED:
        return False
    meta = dict((k, v) for k, v in (e.trailing_metadata() or ()) if isinstance(v, str))
    return meta.get("byzfed-refusal") == "name-taken" or "is taken by" in (e.details() or "")


def not_enrolled(e: grpc.RpcError) -> bool:
    """Whether a refused join says this node's secret is not its name's enrolment secret
    (``security.enrol``: the orchestrator's ``byzfed-refusal: not-enrolled`` trailer)."""
    if e.code() != grpc.StatusCode.UNAUTHENTICATED:
        return False
    meta = dict((k, v) for k, v in (e.trailing_metadata() or ()) if isinstance(v, str))
    return meta.get("byzfed-refusal") == "not-enrolled"


class Backoff:
    """Capped exponential back-off with jitter: the n-th wait (n = 0, 1, ...) is drawn
    uniformly from [c/2, c] with c = min(cap, base * 2**n), so nodes that lost the
    orchestrator together do not come back in lockstep."""

    def __init__(self, base: float, cap: float, rng: Optional[random.Random] = None) -> None:
        self.base, self.cap = base, max(cap, base)
        self.rng = rng or random.Random()
        self.attempt = 0

    def ceiling(self, n: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(n, 64))

    def next(self) -> float:
        c = self.ceiling(self.attempt)
        self.attempt += 1
        return self.rng.uniform(c / 2, c)


@dataclass
class NodeConfig:
    address: str
    name: str
    federation_token: str
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    data_dir: Optional[str] = None
    threads: int = 1
    min_backoff: float = 0.2
    """First retry wait (seconds, before jitter); doubles per attempt up to ``max_backoff``."""
    max_backoff: float = 5.0
    give_up_after: float = 120.0
    """Join and task polls: give up after the orchestrator was unreachable this long."""
    churn: str = ""
    """JSON of the role's self-inflicted churn (``fednode.churn.ChurnSpec``), '' for none."""
    train_slots: int = 0
    """Machine-wide limit of nodes computing at once (0: no limit); see ``fednode.slots``."""
    slot_dir: Optional[str] = None
    idle: str = "warm"
    """'light': shed torch, model and shard after each round (re-exec); 'warm': keep them."""
    after_round: int = -1
    """Skip train tasks of rounds <= this (set by a light node's re-exec)."""
    relaunch: Optional[Callable[[int], None]] = None
    shed_in_place: bool = False
    """A node forked from the warm fork server (``fednode/forkserver.py``): torch is in its
    image already (shared with the other nodes), so a light node sheds its model, shard
    and freed heap after a round in place instead of re-executing (which would import
    torch again for the next round)."""
    """Re-executes this node with ``--after-round R`` (set by ``__main__``)."""
    state_dir: Optional[str] = None
    """Folder for the local algorithm's per-node state (FedDyn, FedSpeed), one file per
    round trained (``fednode.node_state``): the state outlives this process, and a round
    run again after the orchestrator was killed starts from the state before it. None:
    the state is kept in memory only (lost with the process)."""


class Node:
    def __init__(self, config: NodeConfig, behaviour: Any = None) -> None:
        self.cfg = config
        self.churn = Churn(ChurnSpec.from_json(config.churn), config.name) if config.churn else None
        self.client = FederationClient(config.address, churn=self.churn)
        self.slots = TrainSlots(config.slot_dir, config.train_slots) if config.train_slots > 0 else NoSlots()
        self.behaviour = behaviour  # Byzantine behaviour (attacks), None for an honest node
        self.stop = threading.Event()
        self.exit_status = 0  # set to EXIT_NAME_TAKEN when the join finds its name held by another node
        self._need_rejoin = threading.Event()
        self.state: dict[str, Any] = {}  # local-algorithm state kept across rounds (FedDyn, FedSpeed)
        self.state_store = None  # fednode.node_state.NodeStateStore with --state-dir
        if config.state_dir:
            from .node_state import NodeStateStore
            self.state_store = NodeStateStore(config.state_dir, config.name)
        self._work = None  # (model, x, y, num_classes), loaded at the first task
        self._selected_cpu: Optional[float] = None  # process CPU seconds when this round's work began
        self.rounds_done = 0
        self.attempted = (-1, -1, -1)  # (round, model version, attempt) of the last upload sent, refused or given up
        self.rng = random.Random()  # back-off jitter

    # ----- membership -----------------------------------------------------------
    def _backoff(self) -> Backoff:
        return Backoff(self.cfg.min_backoff, self.cfg.max_backoff, self.rng)

    def _retry(self, what: str, fn, until: Optional[threading.Event] = None):
        """``fn()``, retried with back-off while the orchestrator is unreachable (at most
        ``give_up_after`` seconds, then the error is raised); one warning when the outage
        starts and one line when it ends, whatever the number of attempts. None when
        the node is stopping. ``until``: stop retrying (raise) once it is set (e.g. the
        node must re-join: its ingest rank left the aggregation group)."""
        backoff, first_failure, failures = self._backoff(), None, 0
        while not self.stop.is_set():
            try:
                result = fn()
            except grpc.RpcError as e:
                if self.stop.is_set():
                    return None
                if e.code() not in RETRY_CODES or (until is not None and until.is_set()):
                    raise
                failures += 1
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    log.warning("%s: %s: orchestrator unreachable (%s: %s); retrying with back-off (at most %.1fs "
                                "apart) for up to %.0fs", self.cfg.name, what, e.code().name, e.details(),
                                self.cfg.max_backoff, self.cfg.give_up_after)
                elif now - first_failure > self.cfg.give_up_after:
                    log.error("%s: %s: orchestrator still unreachable after %.0fs (%d attempts, %s); giving up",
                              self.cfg.name, what, now - first_failure, failures, e.code().name)
                    raise
                self.stop.wait(backoff.next())
                continue
            if first_failure is not None:
                log.info("%s: %s: orchestrator reachable again after %.1fs (%d failed attempts)", self.cfg.name,
                         what, time.monotonic() - first_failure, failures)
            return result
        return None

    def join(self) -> None:
        try:
            s = self._retry("join", lambda: self.client.join(self.cfg.name, self.cfg.secret, self.cfg.federation_token))
        except grpc.RpcError as e:
            if revoked(e):
                self._revoked(e)
                return
            if not_enrolled(e):
                log.error("%s: join refused: %s; not joining, exiting with status %d", self.cfg.name, e.details(),
                          EXIT_NOT_ENROLLED)
                self.exit_status = EXIT_NOT_ENROLLED
                self.stop.set()
                return
            if not name_taken(e):
                raise
            log.error("%s: node name %r is taken by another holder of the federation token (a node with other "
                      "credentials joined under it first); not joining, exiting with status %d", self.cfg.name,
                      self.cfg.name, EXIT_NAME_TAKEN)
            self.exit_status = EXIT_NAME_TAKEN
            self.stop.set()
            return
        if s is not None:
            self._need_rejoin.clear()
            log.info("%s %s as %s (round %d); uploads to %s (advertised %r)", self.cfg.name,
                     "re-joined" if s.rejoined else "joined", s.node_id, s.current_round, self.client.upload_address,
                     s.ingest_address)

    def _revoked(self, e: grpc.RpcError) -> None:
        log.error("%s: revoked by the orchestrator (%s); exiting with status %d", self.cfg.name, e.details(),
                  EXIT_REVOKED)
        self.exit_status = EXIT_REVOKED
        self.stop.set()

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(max(0.2, self.client.session.lease_seconds / 3)):
            try:
                reply = self.client.heartbeat()
                if reply.shutdown:
                    return
            except grpc.RpcError as e:
                if revoked(e):
                    self._revoked(e)
                    return
                if e.code() in REJOIN_CODES:
                    self._need_rejoin.set()
                # unreachable: the main loop's retries handle it

    # ----- work -----------------------------------------------------------------
    def _warm_up(self) -> None:
        """First use of torch in this process (inside a training slot: importing it is
        ~1.5 s of CPU): set its threads and build a deferred Byzantine behaviour."""
        import torch

        if torch.get_num_threads() != self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if isinstance(self.behaviour, DeferredBehaviour):
            self.behaviour.build()

    def _shed(self) -> None:
        """Drop the model and the shard and hand the freed heap back to the system
        (``malloc_trim``): what a light node keeps between rounds when it was forked."""
        import gc

        self._work = None  # (the dataset stays: the fork server loaded it, its pages are shared)
        gc.collect()
        try:
            import ctypes
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # (not glibc)
            pass

    def _load_work(self):
        if self._work is None:
            from .workload import build_model, load_dataset, shard_for
            w = self.client.session.workload
            ds = load_dataset(w["dataset"], self.cfg.data_dir or w["data_dir"] or None,
                              test_fraction=w["test_fraction"], seed=w["seed"])
            x, y = shard_for(ds, w["shard"], w["num_shards"], w["partition"], w["alpha"], w["seed"])
            model = build_model(w["model"], ds.input_shape, ds.num_classes)
            if self.behaviour is not None:
                x, y = self.behaviour.prepare_data(x, y, ds.num_classes)
            self._work = (model, x, y, ds.num_classes)
        return self._work

    def train(self, task: Task, data: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, int]:
        """Local training on the shard, or on ``data`` (a Byzantine node's poisoned copy),
        inside a training slot; then the role's straggling, outside it."""
        with self.slots.hold():
            delta, n, seconds = self._train(task, data)
        self._straggle(seconds)
        return delta, n

    def _train(self, task: Task, data: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, int, float]:
        """The compute of :meth:`train` (the caller holds a slot): ``(delta, samples, seconds)``."""
        from proto.seeding import generator

        from .training import TrainConfig, train_local

        if self.slots.waited > 1.0:
            log.info("%s: round %d: waited %.1fs for a training slot", self.cfg.name, task.round, self.slots.waited)
        t0, c0 = time.monotonic(), time.process_time()
        model, x, y, num_classes = self._load_work()
        if self._selected_cpu is not None:
            # what this selection cost before training could start (torch, model, shard):
            # read by bench/cross_device.py
            log.info("%s: round %d: start-up %.3f s CPU", self.cfg.name, task.round,
                     time.process_time() - self._selected_cpu)
            self._selected_cpu = None
        if data is not None:
            x, y = data
        t = dict(task.train)
        seed, round_id = t.pop("seed"), t.pop("round")
        t.pop("num_selected", None)  # round facts, not hyper-parameters
        keep_from = t.pop("checkpoint_round", None)
        t.pop("attempt", None)  # (which run of the round this is: the node trains it the same way)
        g = generator(seed, "train", round_id, self.cfg.name)
        cfg = TrainConfig(**t)
        store = self.state_store if self.state_store is not None and _stateful(cfg.algorithm) else None
        if store is not None:  # the state after the newest round before this one (a re-run round: as the first time)
            self.state, _ = store.load_before(round_id, cfg.algorithm)
        delta = train_local(model, self.client.session.layout, task.weights, x, y, cfg, g, self.state, num_classes)
        if store is not None:
            store.save(round_id, cfg.algorithm, self.state, keep_from=keep_from)
        if self.churn is not None:
            self.churn.crash_point("train", task.round)
        task.train_cpu = time.process_time() - c0  # (this process's CPU: the node trains on one thread)
        return delta, len(y), time.monotonic() - t0

    def _straggle(self, seconds: float) -> None:
        if self.churn is not None:
            self.churn.straggle(seconds, self.stop)

    def run(self) -> int:
        if self.cfg.idle == "warm":  # it keeps torch anyway: import it before joining, so round 0 only trains
            with self.slots.hold():
                self._warm_up()
        self.join()
        if self.client.session is None:
            return self.exit_status or 1
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        try:
            while not self.stop.is_set():
                if self._need_rejoin.is_set():
                    self.join()
                try:
                    # the server's longest long-poll (servicer.MAX_WAIT_SECONDS): a waiting poll costs
                    # nothing, each new one costs CPU on both sides (x 1,000 idle nodes)
                    task = self._retry("get task", lambda: self.client.get_task(wait_seconds=20.0),
                                       until=self._need_rejoin)
                except grpc.RpcError as e:
                    if revoked(e):
                        self._revoked(e)
                        break
                    if e.code() in REJOIN_CODES or self._need_rejoin.is_set():
                        self._need_rejoin.set()
                        continue
                    raise
                if task is None or task.kind == "shutdown":
                    break
                if self.behaviour is not None and not self.behaviour.keep_going(self, task):
                    break  # the scenario's leave_at_round: leave (finally) and exit
                if task.kind == "wait":
                    continue
                if task.round <= self.cfg.after_round or _attempt_of(task) <= self.attempted:
                    # done before this process was re-executed, or its upload was sent, refused or
                    # given up: one attempt per round; poll gently until the round closes
                    self.stop.wait(min(1.0, max(0.05, task.deadline_unix - time.time())))
                    continue
                self._acknowledge(task)
                self._do_round(task)
                done_round = task.round
                del task  # (its weights, ~4 bytes a parameter: not kept through the next long-poll)
                if self.cfg.idle == "light" and self.cfg.shed_in_place:
                    self._shed()
                elif self.cfg.idle == "light" and self.cfg.relaunch is not None and "torch" in sys.modules:
                    log.info("%s: round %d done; re-executing to shed torch, model and data", self.cfg.name, done_round)
                    self.cfg.relaunch(done_round)
        finally:
            self.stop.set()
            self._leave()
            self.client.close()
        return self.exit_status

    def _acknowledge(self, task: Task) -> None:
        """Tell the orchestrator the whole task arrived (so a loss from now on counts as
        'during training', not 'during download')."""
        try:
            self.client.heartbeat(received_round=task.round)
        except grpc.RpcError as e:
            if e.code() in REJOIN_CODES:
                self._need_rejoin.set()

    def _do_round(self, task: Task) -> None:
        if self.behaviour is not None:
            if "torch" not in sys.modules or isinstance(self.behaviour, DeferredBehaviour) and not self.behaviour.built:
                with self.slots.hold():  # importing torch and the attacks is compute too
                    self._warm_up()
            self._warm_up()
            self.behaviour.run_round(self, task)
            return
        with self.slots.hold():  # one slot for importing torch, loading the shard and training
            self._selected_cpu = time.process_time()
            self._warm_up()
            delta, n, seconds = self._train(task)
        self._straggle(seconds)
        self.upload(task, delta, n)

    def _transient(self, code: grpc.StatusCode) -> bool:
        """An upload failure worth retrying: the orchestrator or the path to it failed, it did
        not refuse. CANCELLED counts only when this node is not stopping (its own cancel)."""
        if code == grpc.StatusCode.CANCELLED:
            return not self.stop.is_set()
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def upload(self, task: Task, delta: torch.Tensor, num_samples: int, **overrides) -> bool:
        """Send the round's update. Transient failures are retried with back-off until the
        round's deadline (``task.deadline_unix``); refusals are not. Logs one warning when
        the round's upload starts failing and one line with the outcome."""
        name, r = self.cfg.name, task.round
        deadline = task.deadline_unix if task.deadline_unix > 0 else time.time() + self.cfg.give_up_after
        backoff, attempts, started = self._backoff(), 0, time.monotonic()
        while True:
            attempts += 1
            timeout = min(600.0, max(MIN_ATTEMPT_SECONDS, deadline - time.time() + UPLOAD_GRACE_SECONDS))
            try:
                self.client.push_update(r, task.model_version, delta, num_samples, timeout=timeout, **overrides)
            except grpc.RpcError as e:
                code = e.code()
                if not self._transient(code):
                    log.warning("%s: round %d update refused: %s %s%s", name, r, code.name, e.details(),
                                f" (attempt {attempts})" if attempts > 1 else "")
                    if code in REJOIN_CODES:
                        self._need_rejoin.set()  # re-join and take the round's task again
                    else:
                        self.attempted = max(self.attempted, _attempt_of(task))
                    return False
                wait = backoff.next()
                left = deadline - time.time()
                if self._need_rejoin.is_set():  # evicted meanwhile (e.g. its rank left the group): join again
                    log.warning("%s: round %d: giving up the upload to %s: this node must join again (%s: %s)",
                                name, r, self.client.upload_address, code.name, e.details())
                    self.attempted = max(self.attempted, _attempt_of(task))
                    return False
                if self.stop.is_set() or wait >= left:  # no time for another attempt in this round
                    log.warning("%s: round %d: giving up the upload to %s %s after %d attempts in %.1fs (last %s: %s)",
                                name, r, self.client.upload_address,
                                "(stopping)" if self.stop.is_set() else "at the round's deadline", attempts,
                                time.monotonic() - started, code.name, e.details())
                    self.attempted = max(self.attempted, _attempt_of(task))
                    return False
                if attempts == 1:
                    log.warning("%s: round %d: upload failed, orchestrator unreachable at %s (%s: %s); retrying with "
                                "back-off until the round's deadline (%.1fs left)", name, r,
                                self.client.upload_address, code.name, e.details(), left)
                self.stop.wait(wait)
                continue
            self.rounds_done += 1
            self.attempted = max(self.attempted, _attempt_of(task))
            if attempts == 1:
                log.info("%s: round %d update sent%s", name, r, _span(task))
            else:
                log.info("%s: round %d update sent (attempt %d, after %.1fs of retries)", name, r, attempts,
                         time.monotonic() - started)
            return True

    def _leave(self) -> None:
        try:
            if self.client.session is not None:
                self.client.leave("shutdown", timeout=2.0)
        except grpc.RpcError:
            pass


def _span(task: Task) -> str:
    """`` (task to ack X s, download Y s, train Z s CPU)``: from the task's header reaching
    this node to its upload's acknowledgement, the node's whole part of the round
    (bench/round_overhead.py reads it), the download within it, and the CPU its local
    training took (from loading the model and shard to the update)."""
    if not task.header_at:  # (a task that did not come from get_task)
        return ""
    cpu = "" if task.train_cpu is None else f", train {task.train_cpu:.3f} s CPU"
    return f" (task to ack {time.monotonic() - task.header_at:.3f} s, download {task.download_seconds:.3f} s{cpu})"


def _stateful(algorithm: str) -> bool:
    from .strategies import lookup

    return lookup(algorithm)[1].stateful


class DeferredBehaviour:
    """A Byzantine behaviour built at the node's first round instead of at start-up
    (building it imports torch and the attack library). Used only for behaviours the
    launcher already checked against the scenario (``--behaviour-checked``); a node
    started by hand checks its behaviour at start-up and refuses to start when it is
    invalid. Before the role's ``leave_at_round`` the node is kept without building."""

    def __init__(self, text: str, node_name: str) -> None:
        self.text, self.name = text, node_name
        self._leave_at = int(json.loads(text).get("leave_at_round", -1))
        self._real = None

    @property
    def built(self) -> bool:
        return self._real is not None

    def build(self):
        if self._real is None:
            from .byzantine import Behaviour

            self._real = Behaviour.from_json(self.text, self.name)
        return self._real

    def keep_going(self, node: Any, task: Task) -> bool:
        if self._real is None and (self._leave_at < 0 or task.round < self._leave_at):
            return True
        return self.build().keep_going(node, task)

    def run_round(self, node: Any, task: Task) -> None:
        self.build().run_round(node, task)

    def prepare_data(self, x, y, num_classes: int):
        return self.build().prepare_data(x, y, num_classes)

    def close(self) -> None:
        if self._real is not None:
            self._real.close()
