"""What the launcher gives a scenario's Byzantine group besides the wire.

* **Collusion service** (``attacks.collusion``): the Byzantine nodes of the
  scenario form one group and share their benign deltas over gRPC, guarded by a
  random group token. Started in the runner's process when a Byzantine role's
  knowledge is ``colluders`` or the scenario has at least two Byzantine nodes
  (``[adversary] collusion = "auto"``; ``"on"``/``"off"`` force it).
* **Omniscient adversary view** (``proto/byzfed/v1/adversary.proto``),
  SIMULATION ONLY: the round's honest updates, served to Byzantine nodes after
  the honest uploads arrived and before the round closes. It exists only when the
  scenario says ``[adversary] omniscient = true``; then it is registered on the
  orchestrator's server with its own random token (never the federation token),
  announced in red on stderr and in the log, and it answers only sessions of
  nodes that the scenario marks Byzantine. It refuses a non-loopback
  ``federation.host`` unless ``[adversary] allow_non_loopback = true``. Without the
  flag the service is not registered at all, and the scenario check refuses any
  role whose knowledge is ``omniscient`` (its node would refuse to start anyway).

``check_roles`` validates the Byzantine roles of a scenario (attack names and
parameters, schedules, knowledge) when the scenario is loaded.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import grpc
import torch

from attacks import KNOWLEDGE_LEVELS, build_attack, build_schedule
from attacks.collusion import CollusionServer
from proto import codec
from proto.byzfed.v1 import adversary_pb2 as apb
from proto.byzfed.v1 import adversary_pb2_grpc as apb_grpc

from .errors import Refusal

if TYPE_CHECKING:
    from .coordinator import Coordinator
    from .scenario import RoleSection, Scenario

log = logging.getLogger("orchestrator.adversary")

WARNING = "SIMULATION-ONLY omniscient adversary view enabled"


# --------------------------------------------------------------------------- scenario checks

def effective_knowledge(role: "RoleSection") -> str:
    """What the role's attack may read: its ``knowledge`` key, else what the attack needs."""
    if not role.byzantine or not role.attack:
        return "nothing"
    if role.knowledge:
        return role.knowledge
    _, attack_cls = _attack_classes(role.attack)
    return attack_cls.needs


def _attack_classes(name: str):
    from attacks import ATTACKS
    return ATTACKS[name]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_roles(s: "Scenario", need: Callable[[bool, str, str], None]) -> None:
    """Byzantine roles: attack and schedule build, knowledge is known and enough for
    the attack, and an omniscient role has the (loopback-only) adversary view."""
    adv = s.adversary
    need(adv.view_timeout > 0, "adversary.view_timeout", "must be > 0 seconds")
    need(adv.collusion_timeout > 0, "adversary.collusion_timeout", "must be > 0 seconds")
    if adv.omniscient:
        need(adv.view_timeout < s.federation.round_timeout, "adversary.view_timeout",
             "must be shorter than federation.round_timeout")
        need(_is_loopback(s.federation.host) or adv.allow_non_loopback, "adversary.omniscient",
             f"is simulation-only and federation.host = {s.federation.host!r} is not a loopback address; "
             "set adversary.allow_non_loopback = true if you really mean it")
    for i, r in enumerate(s.roles):
        key = f"roles[{i}]"
        need(r.byzantine or not (r.schedule or r.knowledge or r.attack_params), key,
             "has schedule/knowledge/attack_params but byzantine = false")
        if not r.byzantine or not r.attack:
            continue
        try:
            attack = build_attack(r.attack, r.attack_params)
        except ValueError as exc:
            need(False, f"{key}.attack", str(exc))
        try:
            build_schedule(r.schedule)
        except (TypeError, ValueError) as exc:
            need(False, f"{key}.schedule", str(exc))
        need(r.knowledge in ("",) + KNOWLEDGE_LEVELS, f"{key}.knowledge",
             f"= {r.knowledge!r} is not allowed; allowed values: '', {', '.join(map(repr, KNOWLEDGE_LEVELS))}")
        if r.knowledge:
            need(KNOWLEDGE_LEVELS.index(r.knowledge) >= KNOWLEDGE_LEVELS.index(attack.needs), f"{key}.knowledge",
                 f"= {r.knowledge!r} is less than attack {r.attack!r} needs ({attack.needs!r})")
        need(effective_knowledge(r) != "omniscient" or adv.omniscient, f"{key}.attack",
             f"{r.attack!r} with knowledge 'omniscient' needs the adversary view: set [adversary] omniscient = true "
             "(simulation only)")


# --------------------------------------------------------------------------- omniscient view

class AdversaryViewServicer(apb_grpc.AdversaryServicer):
    """SIMULATION ONLY: serves the open round's honest uploads to Byzantine nodes."""

    def __init__(self, coord: "Coordinator", token: str, view_timeout: float,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.coord = coord
        self.token = token
        self.view_timeout = view_timeout
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self.served: dict[int, list[tuple[str, int, int]]] = {}  # round -> (node, rows, expected)

    def _honest_state(self, round_id: int):
        """The open round ``round_id``, its honest uploads and the honest nodes still expected."""
        c = self.coord
        rnd = c.keeper.current
        if rnd is None or rnd.round_id != round_id or rnd.closed:
            return None, [], set()
        uploads = dict(rnd.uploads)
        honest = {}
        for node_id in rnd.selected:
            m = c.membership.get(node_id)
            if m is not None and m.name not in c.byzantine_names:
                honest[node_id] = m
        have = sorted((nid, u) for nid, u in uploads.items() if nid in honest)
        waiting = {nid for nid in honest if nid not in uploads and c.membership.is_alive(nid)}
        return rnd, have, waiting

    def GetHonestUpdates(self, request: apb.GetHonestUpdatesRequest, context):
        c = self.coord
        if not hmac.compare_digest(request.adversary_token.encode(), self.token.encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "adversary view token is wrong")
        try:
            member = c.membership.authenticate(request.session.node_id, request.session.session_token)
        except Refusal as r:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, r.message)
        if member.name not in c.byzantine_names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"node {member.name!r} is not Byzantine in scenario {c.s.name!r}")
        wait = min(request.wait_seconds if request.wait_seconds > 0 else self.view_timeout, self.view_timeout)
        end = time.monotonic() + wait
        while True:
            rnd, have, waiting = self._honest_state(request.round)
            if rnd is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {request.round} is not open; the view serves only the open round")
            if not waiting or time.monotonic() >= end or c.shutdown.is_set() or not context.is_active():
                break
            time.sleep(0.05)
        expected = len(have) + len(waiting)
        with self._lock:
            self.served.setdefault(request.round, []).append((member.name, len(have), expected))
        log.info("adversary view: round %d: %d of %d honest updates served to %s", request.round, len(have),
                    expected, member.name)
        if not have:
            yield apb.HonestUpdatesChunk(header=apb.HonestUpdatesHeader(round=request.round, rows=0,
                                                                        expected=expected))
            return
        rows = torch.stack([u.delta for _, u in have]).to("cpu", torch.float32).contiguous()
        buf = codec.tensor_bytes(rows)
        yield apb.HonestUpdatesChunk(header=apb.HonestUpdatesHeader(
            round=request.round, rows=rows.shape[0], expected=expected,
            tensor=codec.tensor_header(buf, tuple(rows.shape))))
        for chunk in codec.iter_chunks(buf, self.chunk_bytes):
            yield apb.HonestUpdatesChunk(data=chunk)


def warn_loudly(text: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    Console(stderr=True).print(f"[bold red]{escape(text)}[/]")
    log.warning(text)


def add_adversary_view(server: grpc.Server, coord: "Coordinator") -> Optional[AdversaryViewServicer]:
    """Register the omniscient view on ``server`` iff the scenario enables it; else None."""
    adv = coord.s.adversary
    if not adv.omniscient:
        return None
    view = AdversaryViewServicer(coord, secrets.token_hex(16), adv.view_timeout)
    apb_grpc.add_AdversaryServicer_to_server(view, server)
    warn_loudly(f"{WARNING}: Byzantine nodes of scenario {coord.s.name!r} can read every honest update of each "
                "round. Never enable [adversary] omniscient in a deployment.")
    return view


# --------------------------------------------------------------------------- launcher side

def wants_collusion(s: "Scenario") -> bool:
    mode = s.adversary.collusion
    if mode != "auto":
        return mode == "on"
    byz = [r for r in s.roles if r.byzantine and r.count > 0]
    return sum(r.count for r in byz) >= 2 or any(effective_knowledge(r) == "colluders" for r in byz)


class ByzantineSupport:
    """The services of one run's Byzantine group and what each Byzantine node is told.

    ``behaviour_extra(name, role)`` is merged into the node's behaviour JSON:
    the group size ``f``, the collusion service's address and group token, the
    omniscient view's address and token (only to roles whose knowledge is
    omniscient) and the defense rule (only to attacks that need it)."""

    def __init__(self, s: "Scenario", coord: "Coordinator", host: Optional[str] = None) -> None:
        self.s = s
        self.coord = coord
        self.group = sorted(name for name, role in s.node_roles() if role.byzantine)
        self.collusion: Optional[CollusionServer] = None
        self._collusion_token = secrets.token_hex(16)
        if self.group and wants_collusion(s):
            self.collusion = CollusionServer(self.group, self._collusion_token, host or s.federation.host, 0)
            log.info("collusion service for %d Byzantine nodes on %s", len(self.group), self.collusion.address)

    @property
    def view(self) -> Optional[AdversaryViewServicer]:
        return getattr(self.coord, "adversary_view", None)

    def behaviour_extra(self, name: str, role: "RoleSection") -> dict[str, Any]:
        if not role.byzantine:
            return {}
        out: dict[str, Any] = {"role": role.name, "f": len(self.group)}
        if self.collusion is not None:
            out["collusion"] = {"address": self.collusion.address, "token": self._collusion_token,
                                "timeout": self.s.adversary.collusion_timeout}
        if role.attack and effective_knowledge(role) == "omniscient" and self.view is not None:
            out["adversary"] = {"address": self.coord.ingest_address, "token": self.view.token,
                                "timeout": self.s.adversary.view_timeout}
        if role.attack and _attack_classes(role.attack)[1].needs_defense:
            out["defense"] = {"name": self.s.defense.name, "params": self.s.defense.params, "f": self.s.defense.f}
        return out

    def describe(self) -> list[str]:
        lines = []
        if self.collusion is not None:
            lines.append(f"collusion service for {len(self.group)} Byzantine nodes on {self.collusion.address}")
        if self.view is not None:
            lines.append(f"[bold red]{WARNING}[/] on {self.coord.ingest_address}")
        return lines

    def write(self, run_dir: Path) -> None:
        """Per-round records of the collusion service and the view (for metrics and tests)."""
        out: dict[str, Any] = {"group": self.group}
        if self.collusion is not None:
            out["collusion"] = {str(r): h for r, h in sorted(self.collusion.service.history.items())}
        if self.view is not None:
            out["adversary_view"] = {str(r): [list(x) for x in v] for r, v in sorted(self.view.served.items())}
        (run_dir / "adversary.json").write_text(json.dumps(out, indent=2))

    def write_behaviours(self, run_dir: Path, behaviours: dict[str, str]) -> Path:
        """For ``serve`` runs: each Byzantine node's ``--behaviour`` JSON, readable by the owner only."""
        path = run_dir / "byzantine-behaviours.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(behaviours, f, indent=2)
        return path

    def stop(self) -> None:
        if self.collusion is not None:
            self.collusion.stop()
