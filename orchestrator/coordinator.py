"""The orchestrator's composition root: it builds the parts and runs the driver.

Parts (see ``../shared/ARCHITECTURE.md``, "Inside the orchestrator"):
membership (``membership``), the round ledger (``rounds.RoundKeeper`` or
``async_mode.AsyncKeeper``), the row store (``rowstore``) behind the ingest
path (``ingest``), the aggregation pipeline (``pipeline``: gather, defend,
server step, evaluate, record), the group (``collective``) and the driver
(``drivers``). Transport-free: the gRPC servicer calls the public attributes
below, and ``run()`` drives all rounds.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fednode.workload import build_model, load_dataset, partition
from proto.layout import Layout
from proto.seeding import generator

from . import checkpoint, failpoints
from .async_mode import AsyncKeeper
from .collective import AggregationGroup, pick_device
from .group import GroupError
from .defenses import build_defense
from .drivers import AsyncRounds, SyncRounds
from .errors import Refusal
from .evaluate import evaluate
from .enrolment import enrolment_for
from .identity import SessionKeys
from .ingest import Ingest
from .membership import Membership
from .metrics import MetricsWriter
from .pipeline import AggregationPipeline, GlobalModel
from .rounds import Round, RoundKeeper
from .rowstore import RowStore
from .scenario import Scenario
from .server_step import parameter_mask, server_step_for_algorithm


def _glibc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt  # noqa: B018 - glibc has it, musl does not
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None
_STEADY = False
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1
STEADY_MMAP, GLIBC_TRIM = 1 << 20, 128 << 10  # steady_heap's threshold; glibc's default trim threshold


def steady_heap() -> None:
    """Keep the orchestrator's RSS flat over rounds (glibc). A round allocates n update
    buffers of 4d bytes in gRPC worker threads and frees them a round later. glibc raises
    its mmap threshold after the first large free and then serves such buffers from
    per-thread arenas, where they fragment: RSS grew by ~280 MB over the first rounds of
    the cross-device benchmark. A fixed threshold keeps every buffer >= 1 MiB in its own
    mapping, returned to the OS when freed; ``malloc_trim`` after each round returns the
    rest."""
    global _STEADY
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP)
        _STEADY = True


@contextlib.contextmanager
def roomy_heap(mmap_bytes: int = 64 << 20, trim_bytes: int = 256 << 20):
    """For a stretch of many large short-lived temporaries on one thread (evaluating the
    model: a CNN's activations are ~10 MB a batch): serve them from the heap and keep it,
    then return to :func:`steady_heap`'s settings and give the memory back. Under the
    steady settings every activation is a fresh mapping and its page faults made the
    paper CNN's evaluation on MNIST-5k's 1,000 test images take 0.56 s instead of 0.21 s
    (two threads); inside this, 0.21 s."""
    libc = _glibc()
    if libc is None or not _STEADY:  # glibc's own dynamic settings already do this
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
    libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM)
        trim_heap()


def trim_heap() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class Coordinator:
    def __init__(self, scenario: Scenario, run_dir: Path, federation_token: str,
                 on_event: Optional[Callable[[str, dict], None]] = None, *, keys: Optional[SessionKeys] = None,
                 rank: int = 0, group: Optional[AggregationGroup] = None) -> None:
        """``keys``: the run's session keys (the group's, shared by its ranks; new ones by
        default). ``rank`` and ``group``: this process's place in the aggregation group
        (``group.py``); rank 0 leads, another rank is an ingest endpoint that follows."""
        self.s = scenario
        self.rank = rank
        self.keys = (keys or SessionKeys()).lasting(scenario.security.token_epoch(scenario.federation.lease_seconds))
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda kind, info: None)
        data = scenario.data
        self.dataset = load_dataset(data.dataset, data.data_dir or None, test_fraction=data.test_fraction,
                                    seed=scenario.seed)
        with torch.random.fork_rng():
            torch.manual_seed(scenario.seed)
            self.eval_model = build_model(scenario.model.name, self.dataset.input_shape, self.dataset.num_classes)
        self.layout = Layout.from_module(self.eval_model)
        self.layout_json = self.layout.to_json()
        self.layout_hash = self.layout.hash()
        self.device = pick_device(scenario.aggregation.device)
        self.group = group or AggregationGroup(None)
        self.leader = None
        """``group.Leader`` on rank 0 of a group of several ranks (set by the runner)."""
        self.owners: dict[str, int] = {}
        """node -> the aggregation rank that ingests its uploads (the open round's selection)."""
        self.model = GlobalModel(self.layout.flatten(self.eval_model.state_dict()).clone())
        fed = scenario.federation
        self.roster = {name: (i, role) for i, (name, role) in enumerate(scenario.node_roles())}
        self._ids = {i: self.keys.node_id(i, name) for name, (i, _) in self.roster.items()}
        self._names = {self._ids[i]: name for name, (i, _) in self.roster.items()}
        if rank == 0:
            self.membership = Membership(federation_token, fed.lease_seconds, keys=self.keys,
                                         index_of=lambda name: self.roster[name][0],
                                         enrolment=enrolment_for(scenario, run_dir))
        else:
            from .group import RankMembership
            self.membership = RankMembership(self.keys, {i: name for name, (i, _) in self.roster.items()},
                                             fed.lease_seconds, rank)
        self.keeper: RoundKeeper | AsyncKeeper = (
            AsyncKeeper(fed.buffer_size, fed.max_staleness, fed.round_timeout) if fed.mode == "async"
            else RoundKeeper(nonce_fn=self.keys.nonce))
        self.store = RowStore(self.layout.d)
        self.ingest = Ingest(self.keeper, self.store, self.layout.d, elsewhere=self._elsewhere)
        self._started = time.monotonic()
        steady_heap()
        # shards split among the nodes rounds can select (load sessions hold none)
        self.shard_of = {name: j for j, (name, _) in enumerate(scenario.trainer_roles())}
        shards = partition(self.dataset.train_y, len(self.shard_of), data.partition, data.alpha, scenario.seed)
        self.assigned_counts = {name: len(shards[j]) for name, j in self.shard_of.items()}
        """The size of the shard each node is assigned: the most samples it may claim."""
        self.byzantine_names = {name for name, (_, role) in self.roster.items() if role.byzantine}
        self.load_names = frozenset(name for name, (_, role) in self.roster.items() if role.load)
        """Load sessions (``RoleSection.load``): members that rounds never select."""
        self.metrics = MetricsWriter(run_dir)
        self.pipeline = AggregationPipeline(
            layout=self.layout, device=self.device, group=self.group,
            defense=build_defense(scenario.defense.name, scenario.defense.params), f=scenario.defense.f,
            server_step=server_step_for_algorithm(scenario.training.algorithm, scenario.training.params),
            server_lr=fed.server_lr, param_mask=parameter_mask(self.layout), evaluate=self._evaluate,
            model_fn=self._model_fn, generator=lambda r: self.generator(r, "defense"), num_nodes=len(self.shard_of),
            byzantine=frozenset(self.byzantine_names), record=self.record_row)
        self.shutdown = threading.Event()
        self.round_id = 0
        self._payload_lock = threading.Lock()
        self._payload: tuple[int, bytes] | None = None
        self.ingest_address = ""
        self.expected_at_start = len(self.roster)
        self.adversary_view = None  # set by servicer.serve() iff [adversary] omniscient (simulation only)
        self.await_joiners: dict[int, set[str]] = {}  # round -> names the runner starts for that round
        self.checkpoint_round = 0
        self.attempt = 0
        """How many times the current round ran before (a rank died during it; see _group_failed)."""
        """The next round of the last checkpoint written or resumed from: where a resumed run starts."""
        self._maybe_resume()

    # ----- state the servicer reads -------------------------------------------------
    def workload_for(self, name: str) -> str:
        if name not in self.roster:
            raise Refusal("permission_denied", f"node name {name!r} is not in scenario {self.s.name!r}; "
                                               f"expected one of {min(self.roster)} .. {max(self.roster)}")
        shard = self.shard_of.get(name, -1)  # (-1: a load session, which never trains)
        d = self.s.data
        return json.dumps({"model": self.s.model.name, "dataset": d.dataset, "data_dir": d.data_dir,
                           "partition": d.partition, "alpha": d.alpha, "test_fraction": d.test_fraction,
                           "seed": self.s.seed, "num_shards": len(self.shard_of), "shard": shard})

    def train_json(self, r: Round) -> str:
        t = asdict(self.s.training)
        t["seed"] = self.s.seed
        t["round"] = r.round_id
        t["attempt"] = getattr(r, "attempt", 0)  # (a round re-run after a rank died: train it again)
        t["num_selected"] = r.num_selected  # n, for attacks that need the round's size (async: B)
        # the round a resumed run would start from (a node with --state-dir keeps its state back to it)
        t["checkpoint_round"] = self.checkpoint_round if self.s.output.checkpoint_every else r.round_id
        return json.dumps(t)

    def weights_payload(self, model_version: int) -> bytes:
        """Little-endian float32 bytes of the global weights at ``model_version``."""
        with self._payload_lock:
            if self._payload is None or self._payload[0] != model_version:
                self._payload = (model_version, self.model.weights.to("cpu", torch.float32).numpy().tobytes())
            return self._payload[1]

    def open_round(self, round_id: int, selected: set[str], timeout: float, quorum: float, target: int = 0) -> Round:
        """Open a synchronous round: its rows first, then the ledger (no upload can come
        earlier), then (several ranks) the other ranks' part of it."""
        if self.leader is None:
            self.store.open_round(sorted(selected))
            rnd = self.keeper.open(round_id, self.model.version, set(selected), timeout, quorum, target=target)
            rnd.attempt = self.attempt
            return rnd
        self.owners = {n: self.leader.owner(n) for n in selected}
        self.store.open_round(sorted(n for n in selected if self.owners[n] == 0))
        rnd = self.keeper.open(round_id, self.model.version, set(selected), timeout, quorum, target=target)
        rnd.attempt = self.attempt
        self.leader.open(rnd)
        return rnd

    def _elsewhere(self, node_id: str) -> Optional[str]:
        """Why ``node_id`` may not upload to this rank (it is assigned another), or None."""
        r = self.owners.get(node_id)
        if r is None or r == self.rank:
            return None
        return (f"node {node_id} uploads to aggregation rank {r} (the ingest address its Join answered), "
                f"not to rank {self.rank}")

    def node_id_of_index(self, index: int) -> str:
        return self._ids[index]

    def ingest_address_for(self, node_id: str) -> str:
        """The ingest address a joining node is handed (its rank's, with several ranks)."""
        return self.ingest_address if self.leader is None else self.leader.ingest_address_for(node_id)

    def use_layout(self, layout: Layout, weights: torch.Tensor) -> None:
        """Serve another model layout (benchmarks and tests of synthetic sizes); before any node joins."""
        self.layout, self.layout_json, self.layout_hash = layout, layout.to_json(), layout.hash()
        self.model = GlobalModel(weights)
        self.store = RowStore(layout.d)
        self.ingest = Ingest(self.keeper, self.store, layout.d, elsewhere=self._elsewhere)

    def name_of(self, node_id: str) -> str:
        m = self.membership.get(node_id)
        return m.name if m else self._names.get(node_id, node_id)

    def generator(self, round_id: int, purpose: str) -> torch.Generator:
        """The seeded generator of one (round, purpose): ``select`` or ``defense`` (``proto.seeding``)."""
        return generator(self.s.seed, "coordinator", purpose, round_id)

    # ----- the run --------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        s = self.s
        ident = {"scenario": s.name, "seed": s.seed, "layout_hash": self.layout_hash, "defense": s.defense.name,
                 "algorithm": s.training.algorithm, "mode": s.federation.mode, "roster": sorted(self.roster)}
        if s.federation.mode == "async":
            fed = s.federation
            ident["buffer_policy"] = {"buffer_size": fed.buffer_size, "max_staleness": fed.max_staleness,
                                      "staleness_weighting": fed.staleness_weighting,
                                      "staleness_exponent": float(fed.staleness_exponent)}
        return ident

    def _maybe_resume(self) -> None:
        """Rank 0 of a run folder that holds a checkpoint: go on from it (the model, the
        round, the model version, the defense's and the server step's state), and drop
        the metrics rows of rounds after it (they are run again; the dropped rows go to
        ``metrics.interrupted.jsonl``)."""
        path = self.run_dir / "checkpoint.pt"
        if self.rank != 0 or not path.exists():
            return
        ck = checkpoint.load(path)
        checkpoint.check_matches(path, ck, self._identity())
        self.model = GlobalModel(ck["global"].clone(), int(ck["model_version"]), ck.get("defense_state", {}),
                                 ck.get("step_state", {}))
        self.round_id = self.checkpoint_round = int(ck["next_round"])
        redone = self.metrics.rewind(self.round_id)
        note: dict[str, Any] = {"round": self.round_id, "model_version": self.model.version, "rows_redone": redone}
        if "async" in ck:  # the buffer and the open uploads are not resumed: say which were lost
            a = ck["async"]
            note["async_lost"] = {"buffered": a.get("buffered", {}), "in_flight": a.get("in_flight", {}),
                                  "tasks_reissued": sorted(a.get("holding", {}))}
        with open(self.run_dir / "resumed.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(note) + "\n")
        self.on_event("resumed", note)

    def _checkpoint(self) -> None:
        m = self.model
        extra: dict[str, Any] = {}
        if isinstance(self.keeper, AsyncKeeper):  # the buffer's bookkeeping (what a resume loses)
            extra["async"] = self.keeper.bookkeeping(self.name_of)
        checkpoint.save(self.run_dir / "checkpoint.pt", {
            "global": m.weights.cpu(), "next_round": self.round_id, "model_version": m.version,
            "defense_state": m.defense_state, "step_state": m.step_state, **extra, **self._identity()})
        self.checkpoint_round = self.round_id

    def _expire_loop(self) -> None:
        # (every member is looked at each time: with 10,000 sessions and a 60 s lease, 4 times
        # a second was a tenth of the orchestrator's CPU; lease / 8 keeps eviction as prompt)
        lease = self.s.federation.lease_seconds
        period = 0.25 if lease < 8 else min(1.0, lease / 8)
        while not self.shutdown.wait(period):
            self.evict_expired()
            self.keeper.notify()

    def evict_expired(self) -> None:
        for m in self.membership.expire():
            self.on_event("evicted", {"node": m.name})

    def wait_for_nodes(self) -> int:
        want = self.s.federation.min_nodes or self.expected_at_start
        end = time.monotonic() + self.s.federation.join_timeout
        while time.monotonic() < end and not self.shutdown.is_set():
            n = len(self.membership.alive())
            if n >= want:
                return n
            time.sleep(0.1)
        return len(self.membership.alive())

    def run(self) -> dict[str, Any]:
        start = self._started = time.monotonic()
        threading.Thread(target=self._expire_loop, name="lease-expiry", daemon=True).start()
        joined = self.wait_for_nodes()
        self.on_event("ready", {"joined": joined, "expected": len(self.roster)})
        fed = self.s.federation
        driver = AsyncRounds(self) if fed.mode == "async" else SyncRounds(self)
        try:
            while self.round_id < fed.rounds and not self.shutdown.is_set():
                try:
                    driver.step()
                except GroupError as e:
                    if self._group_failed(e):
                        self.attempt += 1
                        continue  # the same round again, on the re-formed group
                self.attempt = 0
                trim_heap()
                self.round_id += 1
                if self.s.output.checkpoint_every and self.round_id % self.s.output.checkpoint_every == 0:
                    self._checkpoint()
                failpoints.reached("between", self.round_id - 1)
        finally:
            self.shutdown.set()
            if self.leader is not None:
                self.leader.stop()
            if isinstance(self.keeper, AsyncKeeper):
                self.keeper.close()
            self.keeper.notify()
        wall = time.monotonic() - start
        summary = self.metrics.summary(wall, {"scenario": self.s.name, "defense": self.s.defense.name,
                                              "nodes": len(self.roster), "d": self.layout.d})
        if self.s.output.plot:
            self.metrics.plot(f"{self.s.name}: {self.s.model.name} on {self.s.data.dataset}, {self.s.defense.name}")
        return summary

    def _group_failed(self, error: GroupError) -> bool:
        """A rank of the aggregation group failed during this round: re-form the group
        without it (gloo) and run the round again (True; ``aggregation.rerun_rounds`` times
        at most, else abandon it: False), or (NCCL, dead leader's store) checkpoint and stop
        with the error. A re-run round is the same round: same model, selection and seeds,
        so its nodes' updates and the run's model are those of a run without the failure."""
        try:
            info = self.leader.recover(error)
        except GroupError:
            self._checkpoint()
            self.on_event("group_failed", {"error": str(error)})
            raise
        finally:
            self.keeper.close_now("abandoned: aggregation group failed")
            self.store.drop()
        rerun = self.attempt < self.s.aggregation.rerun_rounds
        # the moved nodes re-join (another rank) before the (re-run or next) round's selection
        self.await_joiners.setdefault(self.round_id + (0 if rerun else 1), set()).update(info["moved"])
        self.record_row({"round": self.round_id, "model_version": self.model.version,
                         "outcome": f"abandoned: aggregation rank(s) {info['ranks_lost']} failed; the group "
                                    f"re-formed with {len(info['ranks'])} rank(s)"
                                    + ("; the round runs again" if rerun else ""),
                         "attempt": self.attempt, "group": info, "alive": len(self.membership.alive())})
        return rerun

    def record_row(self, row: dict[str, Any]) -> None:
        """Write one metrics row (a round, an async step, or an abandoned/skipped one)."""
        row["late_refused"] = self.keeper.drain_late()  # uploads that came after their round closed, since the last row
        row["wall"] = round(time.monotonic() - self._started, 3)  # seconds since the run started
        self.metrics.write(row)
        self.on_event("round_closed", row)

    def _evaluate(self, weights: torch.Tensor) -> tuple[float, float]:
        with roomy_heap():
            return evaluate(self.eval_model, self.layout, weights, self.dataset.test_x, self.dataset.test_y)

    def _model_fn(self) -> torch.nn.Module:
        return build_model(self.s.model.name, self.dataset.input_shape, self.dataset.num_classes).to(self.device)
