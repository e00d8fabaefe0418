"""A node's scenario-given behaviour: its attack, schedule and churn.

The runner serialises a scenario role into ``--behaviour JSON`` (see
:class:`BehaviourSpec`); :class:`Behaviour` then drives the node's rounds:

* ``prepare_data`` poisons a copy of the shard for data attacks (label flips);
* ``keep_going`` ends the node at ``leave_at_round`` (graceful Leave, exit 0);
* ``run_round`` replaces the honest train + upload. The node drops out of the
  round with probability ``dropout``; in rounds where its schedule is inactive it
  is honest; otherwise it trains, gathers what its knowledge level allows, crafts
  its update with the attack and uploads it through the ordinary client, so the
  orchestrator validates it like any other.

Knowledge (``knowledge`` in the role, default: what the attack needs):

* ``nothing`` / ``own``: the node's own benign delta (it always trains, so its
  timing looks honest);
* ``colluders``: the benign deltas of the scenario's Byzantine group, shared
  through the collusion service (:mod:`attacks.collusion`); alone (no service),
  the group is the node itself;
* ``omniscient``: the round's honest updates from the orchestrator's adversary
  view, which exists only when the scenario enables it. Without its address and
  token the node refuses to start (:class:`BehaviourError`, exit status 2).

Round facts given to the attack: ``n`` is the task's ``num_selected``; ``f`` is
the number of colluders that posted this round when the node colludes, else the
scenario's number of Byzantine nodes, capped at ``n``. Randomness is explicit:
the attack's generator is seeded from ``(seed, round, node)``, drop-outs from
``(seed, round, node)`` too, the schedule from ``(seed, role)`` so that the nodes
of one role are active in the same rounds (all through :mod:`proto.seeding`).

A rule-aware attack (``needs_defense``) gets the scenario's defense through the
``byzfed.defenses`` entry point (:mod:`fednode.rule_provider`), never by
importing the orchestrator; without a provider installed the node refuses it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
import torch

from attacks import KNOWLEDGE_LEVELS, AttackContext, build_attack, build_schedule
from attacks.collusion import CollusionClient, CollusionError
from proto import codec
from proto.byzfed.v1 import adversary_pb2 as apb
from proto.byzfed.v1 import adversary_pb2_grpc as apb_grpc
from proto.byzfed.v1 import federation_pb2 as pb
from proto import tls
from proto.seeding import derive_seed, generator

from .rule_provider import RuleAggregate, RuleProviderError, load_rule_provider

from .client import Task, channel_options, is_relative, resolve_address

log = logging.getLogger("fednode.byzantine")


class BehaviourError(ValueError):
    """The behaviour cannot run as configured; the node refuses to start."""


@dataclass(frozen=True, kw_only=True)
class BehaviourSpec:
    """What the runner tells a node (``--behaviour``); unknown keys are an error."""

    byzantine: bool = False
    attack: str = ""
    attack_params: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    knowledge: str = ""
    leave_at_round: int = -1
    rejoin_at_round: int = -1
    """The runner starts the node again at this round (same secret): a process that
    sees a round >= it does not leave."""
    dropout: float = 0.0
    seed: int = 0
    role: str = ""
    f: int = 0
    """Byzantine nodes in the scenario (the collusion group's size)."""
    collusion: Optional[dict] = None
    """``{address, token, timeout}`` of the group's collusion service (``:PORT``: on the host of
    the orchestrator address this node joined on; see ``fednode.client.resolve_address``)."""
    adversary: Optional[dict] = None
    """``{address, token, timeout}`` of the omniscient view (simulation only); address ``""``: the
    orchestrator address this node joined on (the view is on the orchestrator's server)."""
    defense: Optional[dict] = None
    """``{name, params, f}`` of the server's rule, for attacks with ``needs_defense``."""

    @classmethod
    def from_dict(cls, raw: dict) -> "BehaviourSpec":
        if not isinstance(raw, dict):
            raise BehaviourError(f"behaviour must be a JSON object, got {type(raw).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in allowed:
                raise BehaviourError(f"behaviour has no key {key!r}; allowed: {', '.join(allowed)}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise BehaviourError(f"behaviour: {exc}") from None


class AdversaryViewClient:
    """Reads the round's honest updates from the orchestrator's adversary view
    (SIMULATION ONLY; the service exists only when the scenario enables it)."""

    def __init__(self, address: str, token: str) -> None:
        self.token = token
        self.channel = tls.channel(address, channel_options())  # the node's TLS (proto.tls), if any
        self.stub = apb_grpc.AdversaryStub(self.channel)

    def honest_updates(self, node_id: str, session_token: str, round_id: int, wait_seconds: float) -> Optional[torch.Tensor]:
        """``[h, d]`` honest updates of the open round (None when none arrived)."""
        stream = self.stub.GetHonestUpdates(apb.GetHonestUpdatesRequest(
            adversary_token=self.token, session=pb.Session(node_id=node_id, session_token=session_token),
            round=round_id, wait_seconds=wait_seconds), timeout=wait_seconds + 60.0)
        h = next(stream).header
        if h.rows == 0:
            return None
        flat = codec.decode_stream(h.tensor, (m.data for m in stream))
        return flat.reshape(h.rows, -1)

    def close(self) -> None:
        self.channel.close()


class Behaviour:
    """Drives a node's rounds as its scenario role says (see the module docstring)."""

    def __init__(self, spec: BehaviourSpec, node_name: str, orchestrator: str = "") -> None:
        """``orchestrator``: the address the node joins on, when known; services advertised
        relative to it (see :class:`BehaviourSpec`) are otherwise connected at the first round."""
        self.spec = spec
        self.name = node_name
        if not 0.0 <= spec.dropout <= 1.0:
            raise BehaviourError(f"dropout={spec.dropout!r}: must be in [0, 1]")
        self.attack = None
        if spec.byzantine and spec.attack:
            try:
                self.attack = build_attack(spec.attack, spec.attack_params)
            except ValueError as exc:
                raise BehaviourError(str(exc)) from None
        try:
            self.schedule = build_schedule(spec.schedule)
        except (TypeError, ValueError) as exc:
            raise BehaviourError(f"schedule: {exc}") from None
        self.knowledge = self._knowledge()
        self.collusion: Optional[CollusionClient] = None
        self.view: Optional[AdversaryViewClient] = None
        self._poisoned: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._last_round = (-1, -1)  # (round, attempt) of the last round run (a re-run round: attempt + 1)
        self._rule: Optional[RuleAggregate] = None
        self._view_spec: Optional[dict] = None  # where the view / the collusion service are, until connect()
        self._collusion_spec: Optional[dict] = None
        if self.attack is None:
            return
        adv = spec.adversary or {}
        if self.knowledge == "omniscient" and not (isinstance(adv.get("address"), str) and adv.get("token")):
            raise BehaviourError(
                f"attack {spec.attack!r} with knowledge 'omniscient' needs the adversary view, but the scenario "
                "does not enable it (set [adversary] omniscient = true; simulation only)")
        if self.attack.needs_defense:
            self._rule = self._defense_rule(spec)  # refused here, before any channel is opened
        if self.knowledge == "omniscient":
            self._view_spec = adv  # address '' : the orchestrator address the node joined on
        if self.knowledge == "colluders":
            col = spec.collusion or {}
            if col.get("address") and col.get("token"):
                self._collusion_spec = col
            else:
                log.warning("%s: no collusion service: the group of attack %r is this node alone", node_name,
                            spec.attack)
        self.connect(orchestrator)

    def connect(self, orchestrator: str = "") -> None:
        """Open the clients of the view and of the collusion service (once each). An address
        advertised relative to the orchestrator (``""``, ``:PORT``) waits for ``orchestrator``,
        the address the node joined on (``run_round`` passes it)."""
        if self.view is None and self._view_spec is not None:
            addr = self._view_spec["address"]
            if orchestrator or not is_relative(addr):
                self.view = AdversaryViewClient(resolve_address(addr, orchestrator), self._view_spec["token"])
        if self.collusion is None and self._collusion_spec is not None:
            addr = self._collusion_spec["address"]
            if orchestrator or not is_relative(addr):
                self.collusion = CollusionClient(resolve_address(addr, orchestrator), self._collusion_spec["token"],
                                                 self.name, credentials=tls.channel_credentials())

    @classmethod
    def from_json(cls, text: str, node_name: str, orchestrator: str = "") -> "Behaviour":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BehaviourError(f"behaviour is not JSON: {exc}") from None
        return cls(BehaviourSpec.from_dict(raw), node_name, orchestrator)

    def _knowledge(self) -> str:
        k = self.spec.knowledge
        if k and k not in KNOWLEDGE_LEVELS:
            raise BehaviourError(f"knowledge={k!r}: must be one of {', '.join(map(repr, KNOWLEDGE_LEVELS))}")
        if self.attack is None:
            return k or "nothing"
        if not k:
            return self.attack.needs
        if KNOWLEDGE_LEVELS.index(k) < KNOWLEDGE_LEVELS.index(self.attack.needs):
            raise BehaviourError(f"knowledge={k!r} is less than attack {self.spec.attack!r} needs "
                                 f"({self.attack.needs!r})")
        return k

    # ----- decisions ---------------------------------------------------------------
    def is_active(self, round_id: int) -> bool:
        """Whether the attack runs in ``round_id`` (the role's schedule)."""
        if self.attack is None:
            return False
        return self.schedule.is_active(round_id, derive_seed(self.spec.seed, "schedule", self.spec.role))

    def drops_out(self, round_id: int) -> bool:
        if self.spec.dropout <= 0.0:
            return False
        g = generator(self.spec.seed, "dropout", round_id, self.name)
        return bool(torch.rand((), generator=g) < self.spec.dropout)

    def keep_going(self, node: Any, task: Task) -> bool:
        """False from ``leave_at_round`` until ``rejoin_at_round``: the node leaves."""
        rejoin = self.spec.rejoin_at_round
        if 0 <= self.spec.leave_at_round <= task.round and (rejoin < 0 or task.round < rejoin):
            log.info("%s: leaving at round %d (leave_at_round)", self.name, task.round)
            return False
        return True

    # ----- data ----------------------------------------------------------------------
    def prepare_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a poisoned copy for data attacks; the clean shard serves inactive rounds."""
        if self.attack is not None and self.attack.kind == "data":
            g = generator(self.spec.seed, "poison", self.name)
            self._poisoned = self.attack.poison(x, y, num_classes, g)
            changed = int((self._poisoned[1] != y).sum())
            log.info("%s: %s poisoned %d of %d labels", self.name, self.spec.attack, changed, len(y))
        return x, y

    # ----- one round -----------------------------------------------------------------
    def run_round(self, node: Any, task: Task) -> None:
        self.connect(getattr(node.client, "address", ""))  # services advertised relative to the orchestrator
        r = task.round
        attempt = int((task.train or {}).get("attempt", 0) or 0)
        if (r, attempt) <= self._last_round:
            # Dropped out, or the upload was refused: the open round offers this node its
            # task again. Do the round once only (once per attempt: a round the orchestrator
            # runs again after a rank died is done again); poll gently until it closes.
            node.stop.wait(min(1.0, max(0.05, task.deadline_unix - time.time())))
            return
        self._last_round = (r, attempt)
        if self.drops_out(r):
            log.info("%s: round %d: dropping out (no upload)", self.name, r)
            return
        if not self.is_active(r):
            delta, n = node.train(task)
            node.upload(task, delta, n)
            return
        log.info("%s: round %d: attack %s active (knowledge %s)", self.name, r, self.spec.attack, self.knowledge)
        if self.attack.kind == "data":
            node._load_work()  # runs prepare_data once
            delta, n = node.train(task, data=self._poisoned)
            self._send(node, task, delta, n)
            return
        if self.collusion is not None:
            self._collusion_call("announce", lambda: self.collusion.announce(r))
        own, n_samples = node.train(task)
        try:
            ctx = self._context(node, task, own)
            crafted = self.attack.craft(ctx)
        except (ValueError, RuntimeError, grpc.RpcError) as exc:
            detail = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            log.error("%s: round %d: attack %s could not run (%s); no upload this round", self.name, r,
                      self.spec.attack, detail)
            return
        if self.attack.kind == "wire":
            self._send_malformed(node, task, crafted, n_samples)
        else:
            self._send(node, task, crafted, n_samples)

    def _send(self, node: Any, task: Task, delta: torch.Tensor, n: int) -> bool:
        crc = codec.crc32(codec.tensor_bytes(delta))
        ok = node.upload(task, delta, n)
        log.info("%s: round %d: %s update %s (crc32 %08x, norm %.4g)", self.name, task.round, self.spec.attack,
                 "sent" if ok else "refused", crc, float(delta.norm()))
        return ok

    def _collusion_call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CollusionError as exc:
            log.warning("%s: %s: %s", self.name, what, exc)
            return None

    def _context(self, node: Any, task: Task, own: torch.Tensor) -> AttackContext:
        r, level = task.round, KNOWLEDGE_LEVELS.index(self.knowledge)
        n = int(task.train.get("num_selected") or 0)
        f = max(self.spec.f, 1)
        colluders = honest = None
        if self.knowledge == "colluders":
            colluders = own[None]
            if self.collusion is not None:
                self._collusion_call("post", lambda: self.collusion.post(r, own))
                got = self._collusion_call("fetch", lambda: self.collusion.fetch(r, self._timeout(self.spec.collusion)))
                if got and got[1] is not None:
                    members, colluders = got
                    f = len(members)
                    log.info("%s: round %d: colluders %d (%s)", self.name, r, len(members), ",".join(members))
        if self.view is not None:
            s = node.client.session
            honest = self.view.honest_updates(s.node_id, s.token, r, self._timeout(self.spec.adversary))
            log.info("%s: round %d: adversary view served %d honest updates", self.name, r,
                     0 if honest is None else honest.shape[0])
            if honest is None:
                colluders = own[None]  # nothing arrived: estimate from the own update
        n = n or f + (0 if honest is None else honest.shape[0])
        return AttackContext(
            n=n, f=min(f, n), generator=generator(self.spec.seed, "attack", r, self.name),
            own=own if level >= KNOWLEDGE_LEVELS.index("own") else None, colluders=colluders, honest=honest,
            slices=node.client.session.layout.slices(), round=r, global_weights=task.weights,
            aggregate=self._aggregate(node, task) if self.attack.needs_defense else None)

    @staticmethod
    def _timeout(service: Optional[dict]) -> float:
        return float((service or {}).get("timeout", 10.0))

    @staticmethod
    def _defense_rule(spec: BehaviourSpec) -> RuleAggregate:
        """The scenario's defense as a plain callable, from the ``byzfed.defenses`` plugin
        (:mod:`fednode.rule_provider`): fednode imports nothing of the orchestrator."""
        d = spec.defense or {}
        if not d.get("name"):
            raise BehaviourError(f"attack {spec.attack!r} needs the defense rule, but the behaviour names none")
        try:
            provider = load_rule_provider()
        except RuleProviderError as exc:
            raise BehaviourError(f"attack {spec.attack!r} needs the defense rule {d['name']!r}, but {exc}") from None
        try:
            return provider(d["name"], dict(d.get("params") or {}))
        except ValueError as exc:
            raise BehaviourError(f"attack {spec.attack!r}: defense: {exc}") from None

    def _aggregate(self, node: Any, task: Task) -> Callable[[torch.Tensor], torch.Tensor]:
        """The server's rule as ``[m, d] -> [d]`` for this round, for attacks with ``needs_defense``."""
        rule, d = self._rule, self.spec.defense or {}
        assert rule is not None, "built in __init__ for attacks with needs_defense"
        layout, state, f = node.client.session.layout, {}, int(d.get("f", 0))

        def aggregate(rows: torch.Tensor) -> torch.Tensor:
            return rule(rows, f=f, generator=generator(self.spec.seed, "rule", task.round), layout=layout,
                        global_weights=task.weights, round=task.round, state=state)
        return aggregate

    def _send_malformed(self, node: Any, task: Task, delta: torch.Tensor, n: int) -> None:
        """Corrupt the upload as the ``malformed`` attack's mode says; the orchestrator must refuse it."""
        mode = self.attack.mode
        overrides: dict[str, Any] = {}
        if mode == "bad_checksum":
            overrides["crc32"] = codec.crc32(codec.tensor_bytes(delta)) ^ 0xFFFFFFFF
        elif mode == "wrong_size":
            delta = delta[:-1]
        elif mode == "wrong_dtype":
            overrides["dtype"] = "float64"
        elif mode == "wrong_round":
            overrides["round"] = task.round + 1_000_000  # never a round that could be open
        elif mode == "wrong_layout":
            overrides["layout_hash"] = "0" * 16
        elif mode == "bad_token":
            overrides["session_token"] = secrets.token_hex(16)
        elif mode == "duplicate":
            node.upload(task, delta, n)
        ok = node.upload(task, delta, n, **overrides)
        log.info("%s: round %d: malformed upload (%s) %s", self.name, task.round, mode,
                 "was ACCEPTED" if ok else "refused")

    def close(self) -> None:
        for c in (self.collusion, self.view):
            if c is not None:
                c.close()
