"""The orchestrator's core: membership, rounds, defense, apply, evaluate, checkpoint.

Transport-free: the gRPC servicer calls into it, and it calls the aggregation
group (``collective``) and the defense registry. One ``run()`` drives all rounds.
"""
from __future__ import annotations

import ctypes
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fednode.workload import build_model, load_dataset
from proto.layout import Layout

from . import checkpoint
from .async_mode import AsyncKeeper, AsyncRounds
from .collective import AggregationGroup, pick_device
from .defenses import RoundContext, build_defense
from .errors import Refusal
from .evaluate import evaluate
from .membership import Membership
from .metrics import MetricsWriter, detection_scores
from .rounds import Round, RoundKeeper
from .scenario import Scenario
from .selection import select
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
M_MMAP_THRESHOLD = -3


def steady_heap() -> None:
    """Keep the orchestrator's RSS flat over rounds (glibc). A round allocates n update
    buffers of 4d bytes in gRPC worker threads and frees them a round later. glibc raises
    its mmap threshold after the first large free and then serves such buffers from
    per-thread arenas, where they fragment: RSS grew by ~280 MB over the first rounds of
    the cross-device benchmark. A fixed threshold keeps every buffer >= 1 MiB in its own
    mapping, returned to the OS when freed; ``malloc_trim`` after each round returns the
    rest."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def trim_heap() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def round_generator(seed: int, round_id: int, role: int) -> torch.Generator:
    """Explicit randomness: one generator per (seed, round, role)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + round_id * 7_919 + role) % (2**63 - 1))
    return g


ROLE_SELECT, ROLE_DEFENSE = 1, 2


class Coordinator:
    def __init__(self, scenario: Scenario, run_dir: Path, federation_token: str,
                 on_event: Optional[Callable[[str, dict], None]] = None) -> None:
        self.s = scenario
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda kind, info: None)
        data = scenario.data
        self.dataset = load_dataset(data.dataset, data.data_dir or None, test_fraction=data.test_fraction,
                                    seed=scenario.seed)
        with torch.random.fork_rng():
            torch.manual_seed(scenario.seed)
            self.model = build_model(scenario.model.name, self.dataset.input_shape, self.dataset.num_classes)
        self.layout = Layout.from_module(self.model)
        self.layout_json = self.layout.to_json()
        self.layout_hash = self.layout.hash()
        self.device = pick_device(scenario.aggregation.device)
        self.group = AggregationGroup(None)
        self.global_vec = self.layout.flatten(self.model.state_dict()).clone()
        self.defense = build_defense(scenario.defense.name, scenario.defense.params)
        self.defense_state: dict[str, Any] = {}
        self.server_step = server_step_for_algorithm(scenario.training.algorithm, scenario.training.params)
        self.step_state: dict[str, Any] = {}
        self._param_mask = parameter_mask(self.layout)
        self.membership = Membership(federation_token, scenario.federation.lease_seconds)
        fed = scenario.federation
        self.keeper: RoundKeeper | AsyncKeeper = (
            AsyncKeeper(fed.buffer_size, fed.max_staleness, fed.round_timeout) if fed.mode == "async" else RoundKeeper())
        self._started = time.monotonic()
        steady_heap()
        self.roster = {name: (i, role) for i, (name, role) in enumerate(scenario.node_roles())}
        self.byzantine_names = {name for name, (_, role) in self.roster.items() if role.byzantine}
        self.metrics = MetricsWriter(run_dir)
        self.shutdown = threading.Event()
        self.round_id = 0
        self.model_version = 0
        self._payload_lock = threading.Lock()
        self._payload: tuple[int, bytes] | None = None
        self.ingest_address = ""
        self.expected_at_start = len(self.roster)
        self.adversary_view = None  # set by servicer.serve() iff [adversary] omniscient (simulation only)
        self.await_joiners: dict[int, set[str]] = {}  # round -> names the runner starts for that round
        self._maybe_resume()

    # ----- state the servicer reads -------------------------------------------------
    def workload_for(self, name: str) -> str:
        if name not in self.roster:
            raise Refusal("permission_denied", f"node name {name!r} is not in scenario {self.s.name!r}; "
                                               f"expected one of {min(self.roster)} .. {max(self.roster)}")
        shard, _ = self.roster[name]
        d = self.s.data
        return json.dumps({"model": self.s.model.name, "dataset": d.dataset, "data_dir": d.data_dir,
                           "partition": d.partition, "alpha": d.alpha, "test_fraction": d.test_fraction,
                           "seed": self.s.seed, "num_shards": len(self.roster), "shard": shard})

    def train_json(self, r: Round) -> str:
        t = asdict(self.s.training)
        t["seed"] = self.s.seed
        t["round"] = r.round_id
        t["num_selected"] = r.num_selected  # n, for attacks that need the round's size (async: B)
        return json.dumps(t)

    def weights_payload(self, model_version: int) -> bytes:
        """Little-endian float32 bytes of the global weights at ``model_version``."""
        with self._payload_lock:
            if self._payload is None or self._payload[0] != model_version:
                self._payload = (model_version, self.global_vec.to("cpu", torch.float32).numpy().tobytes())
            return self._payload[1]

    # ----- the run --------------------------------------------------------------
    def _maybe_resume(self) -> None:
        path = self.run_dir / "checkpoint.pt"
        if not path.exists():
            return
        ck = checkpoint.load(path)
        if ck.get("layout_hash") != self.layout_hash:
            raise RuntimeError(f"{path} was written for another model layout")
        self.global_vec = ck["global"].clone()
        self.round_id = int(ck["next_round"])
        self.model_version = int(ck["model_version"])
        self.defense_state = ck.get("defense_state", {})
        self.step_state = ck.get("step_state", {})
        self.on_event("resumed", {"round": self.round_id})

    def _checkpoint(self) -> None:
        checkpoint.save(self.run_dir / "checkpoint.pt", {
            "global": self.global_vec.cpu(), "next_round": self.round_id, "model_version": self.model_version,
            "layout_hash": self.layout_hash, "defense_state": self.defense_state, "step_state": self.step_state, "scenario": self.s.name})

    def _expire_loop(self) -> None:
        while not self.shutdown.wait(0.25):
            self._evict_expired()
            self.keeper.notify()

    def _evict_expired(self) -> None:
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
        step = AsyncRounds(self).step if fed.mode == "async" else self._one_round
        try:
            while self.round_id < fed.rounds and not self.shutdown.is_set():
                step()
                trim_heap()
                self.round_id += 1
                if self.s.output.checkpoint_every and self.round_id % self.s.output.checkpoint_every == 0:
                    self._checkpoint()
        finally:
            self.shutdown.set()
            if isinstance(self.keeper, AsyncKeeper):
                self.keeper.close()
            self.keeper.notify()
        wall = time.monotonic() - start
        summary = self.metrics.summary(wall, {"scenario": self.s.name, "defense": self.s.defense.name,
                                              "nodes": len(self.roster), "d": self.layout.d})
        if self.s.output.plot:
            self.metrics.plot(f"{self.s.name}: {self.s.model.name} on {self.s.data.dataset}, {self.s.defense.name}")
        return summary

    def _membership_row(self, r_id: int) -> dict[str, Any]:
        """The start of a metrics row: membership now and the joins/leaves since the last row."""
        events = self.membership.drain_events()
        return {"round": r_id, "model_version": self.model_version, "alive": len(self.membership.alive()),
                "joined": [self._name(n) for e, n in events if e == "join"],
                "left": [self._name(n) for e, n in events if e == "leave"],
                "evicted": [self._name(n) for e, n in events if e == "evict"]}

    def _one_round(self) -> None:
        fed = self.s.federation
        r_id = self.round_id
        self._await_joiners(r_id)
        # with nobody alive (e.g. all evicted by a network cut) give nodes a deadline to come back
        end = time.monotonic() + fed.round_timeout
        while not self.membership.alive() and time.monotonic() < end and not self.shutdown.is_set():
            time.sleep(0.1)
        self._evict_expired()  # a node whose lease just ran out is never selected
        names = {m.node_id: m.name for m in self.membership.alive()}
        selected = select(list(names), fed.selection, fed.sample_size, round_generator(self.s.seed, r_id, ROLE_SELECT),
                          over_selection=fed.over_selection)
        row = self._membership_row(r_id)
        row.update(alive=len(names), selected=len(selected), selected_nodes=sorted(names[n] for n in selected))
        if not selected:
            row.update(outcome="abandoned: no node alive", reported=0)
            self._finish_row(row)
            return
        self.weights_payload(self.model_version)
        t0 = time.monotonic()
        # over-selection: close once sample_size reported; the rest are refused as late
        target = fed.sample_size if fed.selection == "sample" and fed.over_selection > 1 else 0
        self.keeper.open(r_id, self.model_version, set(selected), fed.round_timeout, fed.quorum, target=target)
        self.on_event("round_open", {"round": r_id, "selected": [names[n] for n in selected]})
        rnd = self.keeper.wait_close(self.membership.is_alive)
        t_collect = time.monotonic() - t0
        uploads = [rnd.uploads[n] for n in sorted(rnd.uploads)]
        phases = {self._name(n): p for n, p in rnd.dropped_phases().items()}
        row.update(outcome=rnd.outcome, reported=len(uploads), quorum=rnd.quorum,
                   missing=sorted(phases), refused=dict(rnd.refused),
                   dropped={p: sum(1 for v in phases.values() if v == p) for p in ("download", "train", "upload")},
                   dropped_at=dict(sorted(phases.items())),
                   late=sum(1 for n in rnd.missing if self.membership.is_alive(n) and n not in rnd.broken),
                   bytes_received=sum(u.num_bytes for u in uploads), t_collect=round(t_collect, 4))
        row["byzantine_selected"] = sum(1 for n in selected if self._name(n) in self.byzantine_names)
        if rnd.outcome.startswith("abandoned"):
            self._finish_row(row)
            return
        self._aggregate(uploads, row, r_id)

    def _aggregate(self, uploads: list, row: dict[str, Any], r_id: int, scale: Optional[torch.Tensor] = None) -> None:
        """Defend, apply, evaluate and write the row: the same for a round and an async step.
        ``scale``: per-row factors applied before the defense (async staleness weights)."""
        fed = self.s.federation
        t1 = time.monotonic()
        rows = torch.stack([u.delta for u in uploads])
        if scale is not None:
            rows = rows * scale.to(rows.dtype)[:, None]
        updates, _ = self.group.gather_rows(rows.to(self.device))
        ctx = RoundContext(layout=self.layout, global_weights=self.global_vec.to(self.device), round=r_id,
                           f=self.s.defense.f, generator=round_generator(self.s.seed, r_id, ROLE_DEFENSE),
                           state=self.defense_state, model_fn=self._model_fn,
                           sample_counts=torch.tensor([u.num_samples for u in uploads], dtype=torch.float32),
                           client_ids=[self._name(u.node_id) for u in uploads])
        result = self.defense(updates, ctx)
        delta = result.delta.to("cpu", torch.float32)
        t_aggregate = time.monotonic() - t1
        if not torch.isfinite(delta).all():
            row.update(outcome="skipped: defense returned non-finite delta", t_aggregate=round(t_aggregate, 4))
            self._finish_row(row)
            return
        self.global_vec = self.global_vec + self.server_step(
            delta, self.step_state, num_participants=int(result.accepted.sum()), num_nodes=len(self.roster),
            lr=fed.server_lr, mask=self._param_mask)
        self.model_version += 1
        accepted = {self._name(u.node_id): bool(a) for u, a in zip(uploads, result.accepted.cpu().tolist())}
        t2 = time.monotonic()
        acc, loss = evaluate(self.model, self.layout, self.global_vec, self.dataset.test_x, self.dataset.test_y)
        n_acc = sum(accepted.values())
        byz_acc = sum(1 for n, ok in accepted.items() if ok and n in self.byzantine_names)
        row.update(accuracy=acc, loss=loss, accepted=n_acc,
                   rejected=sorted(n for n, ok in accepted.items() if not ok),
                   byzantine_accepted=byz_acc,
                   byzantine_share_selected=round(row.get("byzantine_selected", 0) / max(1, row.get("selected", 0)), 4),
                   byzantine_share_accepted=round(byz_acc / max(1, n_acc), 4),
                   t_aggregate=round(t_aggregate, 4), t_evaluate=round(time.monotonic() - t2, 4),
                   update_norm=float(delta.norm()))
        if self.byzantine_names:
            row.update(detection_scores(accepted, self.byzantine_names))
        row["diagnostics"] = {k: v for k, v in result.diagnostics.items() if isinstance(v, (int, float, str, bool))}
        self._finish_row(row)

    def _await_joiners(self, r_id: int) -> None:
        """Nodes started for round ``r_id`` (join_at_round, rejoin_at_round) take part in it:
        wait for them to join before selecting, at most ``federation.join_timeout``."""
        names = self.await_joiners.pop(r_id, set())
        end = time.monotonic() + self.s.federation.join_timeout
        while names and time.monotonic() < end and not self.shutdown.is_set():
            if names <= {m.name for m in self.membership.alive()}:
                return
            time.sleep(0.05)

    def _finish_row(self, row: dict[str, Any]) -> None:
        row["late_refused"] = self.keeper.drain_late()  # uploads that came after their round closed, since the last row
        row["wall"] = round(time.monotonic() - self._started, 3)  # seconds since the run started
        self.metrics.write(row)
        self.on_event("round_closed", row)

    def _name(self, node_id: str) -> str:
        m = self.membership.get(node_id)
        return m.name if m else node_id

    def _model_fn(self) -> torch.nn.Module:
        return build_model(self.s.model.name, self.dataset.input_shape, self.dataset.num_classes).to(self.device)
