"""The client process: join, heartbeat in the background, then loop over tasks.

An idle node holds no model or dataset: both are loaded at its first task.
When the orchestrator is briefly unreachable the node retries with exponential
backoff; when its lease was lost it re-joins with the same credentials and gets
its identity back.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import grpc
import torch

from .client import FederationClient, Task
from .training import TrainConfig, train_local

log = logging.getLogger("fednode")

RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
REJOIN_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}


@dataclass
class NodeConfig:
    address: str
    name: str
    federation_token: str
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    data_dir: Optional[str] = None
    threads: int = 1
    max_backoff: float = 5.0
    give_up_after: float = 120.0


class Node:
    def __init__(self, config: NodeConfig, behaviour: Any = None) -> None:
        self.cfg = config
        self.client = FederationClient(config.address)
        self.behaviour = behaviour  # Byzantine behaviour (attacks), None for an honest node
        self.stop = threading.Event()
        self._need_rejoin = threading.Event()
        self.state: dict[str, Any] = {}  # local-algorithm state kept across rounds (FedDyn, FedSpeed)
        self._work = None  # (model, x, y, num_classes), loaded at the first task
        self.rounds_done = 0

    # ----- membership -----------------------------------------------------------
    def _retry(self, what: str, fn):
        delay, first_failure = 0.2, None
        while not self.stop.is_set():
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
                first_failure = first_failure or time.monotonic()
                if time.monotonic() - first_failure > self.cfg.give_up_after:
                    raise
                log.warning("%s: orchestrator unreachable (%s); retrying in %.1fs", what, e.code().name, delay)
                self.stop.wait(delay)
                delay = min(self.cfg.max_backoff, delay * 2)
        return None

    def join(self) -> None:
        s = self._retry("join", lambda: self.client.join(self.cfg.name, self.cfg.secret, self.cfg.federation_token))
        if s is not None:
            self._need_rejoin.clear()
            log.info("%s %s as %s (round %d)", self.cfg.name, "re-joined" if s.rejoined else "joined", s.node_id,
                     s.current_round)

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(max(0.2, self.client.session.lease_seconds / 3)):
            try:
                reply = self.client.heartbeat()
                if reply.shutdown:
                    return
            except grpc.RpcError as e:
                if e.code() in REJOIN_CODES:
                    self._need_rejoin.set()
                # unreachable: the main loop's retries handle it

    # ----- work -----------------------------------------------------------------
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
        """Local training on the shard, or on ``data`` (a Byzantine node's poisoned copy)."""
        model, x, y, num_classes = self._load_work()
        if data is not None:
            x, y = data
        t = dict(task.train)
        seed, round_id = t.pop("seed"), t.pop("round")
        t.pop("num_selected", None)  # round facts, not hyper-parameters
        g = torch.Generator().manual_seed((seed * 1_000_003 + round_id * 7_919 + zlib.crc32(self.cfg.name.encode())) % (2**63))
        cfg = TrainConfig(**t)
        delta = train_local(model, self.client.session.layout, task.weights, x, y, cfg, g, self.state, num_classes)
        return delta, len(y)

    def run(self) -> int:
        torch.set_num_threads(self.cfg.threads)
        self.join()
        if self.client.session is None:
            return 1
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        try:
            while not self.stop.is_set():
                if self._need_rejoin.is_set():
                    self.join()
                try:
                    task = self._retry("get task", lambda: self.client.get_task(wait_seconds=10.0))
                except grpc.RpcError as e:
                    if e.code() in REJOIN_CODES:
                        self._need_rejoin.set()
                        continue
                    raise
                if task is None or task.kind == "shutdown":
                    break
                if self.behaviour is not None and not self.behaviour.keep_going(self, task):
                    break  # the scenario's leave_at_round: leave (finally) and exit
                if task.kind == "wait":
                    continue
                self._do_round(task)
        finally:
            self.stop.set()
            self._leave()
            self.client.close()
        return 0

    def _do_round(self, task: Task) -> None:
        if self.behaviour is not None:
            self.behaviour.run_round(self, task)
            return
        delta, n = self.train(task)
        self.upload(task, delta, n)

    def upload(self, task: Task, delta: torch.Tensor, num_samples: int, **overrides) -> bool:
        try:
            self.client.push_update(task.round, task.model_version, delta, num_samples, **overrides)
            self.rounds_done += 1
            log.info("%s: round %d update sent", self.cfg.name, task.round)
            return True
        except grpc.RpcError as e:
            log.warning("%s: round %d update refused: %s %s", self.cfg.name, task.round, e.code().name, e.details())
            if e.code() in REJOIN_CODES:
                self._need_rejoin.set()
            return False

    def _leave(self) -> None:
        try:
            if self.client.session is not None:
                self.client.leave("shutdown", timeout=2.0)
        except grpc.RpcError:
            pass
