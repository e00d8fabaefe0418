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

``check_roles`` (defined in :mod:`orchestrator.checks`, which imports neither gRPC
nor process control, and re-exported here) validates the Byzantine roles of a
scenario (attack names and parameters, schedules, knowledge) when it is loaded.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import grpc
import torch

from attacks.collusion import CollusionServer
from proto import codec
from proto.byzfed.v1 import adversary_pb2 as apb
from proto.byzfed.v1 import adversary_pb2_grpc as apb_grpc

from .addresses import advertised_address
from .checks import _attack_classes, _is_loopback, check_roles, effective_knowledge  # noqa: F401 (re-exported)
from .errors import Refusal
from .security import server_tls

if TYPE_CHECKING:
    from .coordinator import Coordinator
    from .scenario import RoleSection, Scenario

log = logging.getLogger("orchestrator.adversary")

WARNING = "SIMULATION-ONLY omniscient adversary view enabled"


# --------------------------------------------------------------------------- omniscient view

class AdversaryViewServicer(apb_grpc.AdversaryServicer):
    """SIMULATION ONLY: serves the open round's honest uploads to Byzantine nodes.

    On the orchestrator's ``grpc.aio`` server the view is :meth:`GetHonestUpdatesAsync`
    (raw request bytes parsed here, a waiting call holds no thread, at most
    ``VIEWS_PER_NODE`` open calls per node, a stream not read for ``view_timeout`` is
    cut); :meth:`GetHonestUpdates` serves a threaded ``grpc.server`` (unit tests)."""

    VIEWS_PER_NODE = 2
    MAX_REQUEST_BYTES = 4 << 10

    def __init__(self, coord: "Coordinator", token: str, view_timeout: float,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.coord = coord
        self.token = token
        self.view_timeout = view_timeout
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self.served: dict[int, list[tuple[str, int, int]]] = {}  # round -> (node, rows, expected)
        self._open: dict[str, int] = {}  # node -> open async calls

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

    def _admit(self, request: apb.GetHonestUpdatesRequest):
        """The Byzantine member asking, and how long it may wait; else ``(code, message)``."""
        c = self.coord
        if not hmac.compare_digest(request.adversary_token.encode(), self.token.encode()):
            return None, (grpc.StatusCode.UNAUTHENTICATED, "adversary view token is wrong")
        if not (math.isfinite(request.wait_seconds) and request.wait_seconds >= 0):
            return None, (grpc.StatusCode.INVALID_ARGUMENT,
                          f"wait_seconds must be a finite number >= 0 (0: the view's timeout), got {request.wait_seconds!r}")
        try:
            member = c.membership.authenticate(request.session.node_id, request.session.session_token)
        except Refusal as r:
            return None, (grpc.StatusCode.UNAUTHENTICATED, r.message)
        if member.name not in c.byzantine_names:
            return None, (grpc.StatusCode.PERMISSION_DENIED,
                          f"node {member.name!r} is not Byzantine in scenario {c.s.name!r}")
        wait = min(request.wait_seconds if request.wait_seconds > 0 else self.view_timeout, self.view_timeout)
        return (member, wait), None

    def _check(self, request, end: float):
        """``(done, refusal, have, waiting)`` for one look at the round."""
        rnd, have, waiting = self._honest_state(request.round)
        if rnd is None:
            return True, (grpc.StatusCode.FAILED_PRECONDITION,
                          f"round {request.round} is not open; the view serves only the open round"), have, waiting
        return (not waiting or time.monotonic() >= end or self.coord.shutdown.is_set()), None, have, waiting

    def _record(self, request, member, have, waiting) -> int:
        expected = len(have) + len(waiting)
        with self._lock:
            self.served.setdefault(request.round, []).append((member.name, len(have), expected))
        log.info("adversary view: round %d: %d of %d honest updates served to %s", request.round, len(have),
                 expected, member.name)
        return expected

    def _reply(self, request, have, expected: int) -> list:
        """The header chunk and the rows' bytes (``have``: the honest uploads to serve)."""
        if not have:
            return [apb.HonestUpdatesChunk(header=apb.HonestUpdatesHeader(round=request.round, rows=0,
                                                                           expected=expected))]
        rows = torch.stack([self.coord.store.row(nid) for nid, _ in have]).to("cpu", torch.float32).contiguous()
        buf = codec.tensor_bytes(rows)
        out = [apb.HonestUpdatesChunk(header=apb.HonestUpdatesHeader(
            round=request.round, rows=rows.shape[0], expected=expected,
            tensor=codec.tensor_header(buf, tuple(rows.shape))))]
        out += [apb.HonestUpdatesChunk(data=chunk) for chunk in codec.iter_chunks(buf, self.chunk_bytes)]
        return out

    def GetHonestUpdates(self, request: apb.GetHonestUpdatesRequest, context):
        admitted, refusal = self._admit(request)
        if refusal is not None:
            context.abort(*refusal)
        member, wait = admitted
        end = time.monotonic() + wait
        while True:
            done, refusal, have, waiting = self._check(request, end)
            if refusal is not None:
                context.abort(*refusal)
            if done or not context.is_active():
                break
            time.sleep(0.05)
        expected = self._record(request, member, have, waiting)
        yield from self._reply(request, have, expected)

    async def GetHonestUpdatesAsync(self, raw: bytes, context) -> None:
        import asyncio

        from google.protobuf.message import DecodeError

        if len(raw) > self.MAX_REQUEST_BYTES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"GetHonestUpdatesRequest of {len(raw)} bytes "
                                f"is over the limit of {self.MAX_REQUEST_BYTES} bytes")
        try:
            request = apb.GetHonestUpdatesRequest.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed GetHonestUpdatesRequest: not a valid "
                                "protobuf message (a corrupt field, or a string field that is not UTF-8)")
        admitted, refusal = self._admit(request)
        if refusal is not None:
            await context.abort(*refusal)
        member, wait = admitted
        node = member.node_id
        if self._open.get(node, 0) >= self.VIEWS_PER_NODE:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {node} already has {self._open[node]} "
                                f"adversary-view calls open (limit {self.VIEWS_PER_NODE} per node)")
        self._open[node] = self._open.get(node, 0) + 1
        try:
            end = time.monotonic() + wait
            while True:
                done, refusal, have, waiting = self._check(request, end)
                if refusal is not None:
                    await context.abort(*refusal)
                if done:
                    break
                await asyncio.sleep(0.05)
            expected = self._record(request, member, have, waiting)
            chunks = await asyncio.get_running_loop().run_in_executor(None, self._reply, request, have, expected)
            for chunk in chunks:
                try:
                    await asyncio.wait_for(context.write(chunk), self.view_timeout)
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the view's stream was not read for "
                                        f"{self.view_timeout:g} s; cut")
        finally:
            self._open[node] -= 1
            if not self._open[node]:
                del self._open[node]


def warn_loudly(text: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    Console(stderr=True).print(f"[bold red]{escape(text)}[/]")
    log.warning(text)


def add_adversary_view(server, coord: "Coordinator") -> Optional[AdversaryViewServicer]:
    """Register the omniscient view on ``server`` (a ``grpc.aio.Server``, or a threaded
    ``grpc.Server``) iff the scenario enables it; else None."""
    adv = coord.s.adversary
    if not adv.omniscient:
        return None
    view = AdversaryViewServicer(coord, secrets.token_hex(16), adv.view_timeout)
    if isinstance(server, grpc.aio.Server):
        service = apb.DESCRIPTOR.services_by_name["Adversary"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            "GetHonestUpdates": grpc.unary_stream_rpc_method_handler(
                view.GetHonestUpdatesAsync, response_serializer=apb.HonestUpdatesChunk.SerializeToString)}),))
    else:
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
        self.collusion_address = ""
        """What Byzantine nodes are told to dial (``servicer.advertised_address``; ':PORT' when
        it listens on a wildcard address with no advertise host: the host of the node's orchestrator)."""
        if self.group and wants_collusion(s):
            bind = host or s.federation.host
            tls = server_tls(s, coord.run_dir) if s.security.enabled else None
            self.collusion = CollusionServer(self.group, self._collusion_token, bind, 0,
                                             credentials=tls.credentials() if tls is not None else None)
            told, service = getattr(coord, "on_event", lambda kind, info: None), self.collusion.service

            def on_event(kind: str, info: dict, told=told) -> None:  # a round's selected colluders
                if kind == "round_open":
                    service.expect(int(info["round"]), info["selected"])
                told(kind, info)

            coord.on_event = on_event
            port = int(self.collusion.address.rsplit(":", 1)[1])
            self.collusion_address = advertised_address(bind, port, s.federation.advertise_host) or f":{port}"
            log.info("collusion service for %d Byzantine nodes on %s (nodes dial %s)", len(self.group),
                     self.collusion.address, self.collusion_address)

    @property
    def view(self) -> Optional[AdversaryViewServicer]:
        return getattr(self.coord, "adversary_view", None)

    def behaviour_extra(self, name: str, role: "RoleSection") -> dict[str, Any]:
        if not role.byzantine:
            return {}
        out: dict[str, Any] = {"role": role.name, "f": len(self.group)}
        if self.collusion is not None:
            out["collusion"] = {"address": self.collusion_address, "token": self._collusion_token,
                                "timeout": self.s.adversary.collusion_timeout}
        if role.attack and effective_knowledge(role) == "omniscient" and self.view is not None:
            # the view is on the orchestrator's server: its advertised address ('' = the one the node joined on)
            out["adversary"] = {"address": self.coord.ingest_address, "token": self.view.token,
                                "timeout": self.s.adversary.view_timeout}
        if role.attack and _attack_classes(role.attack)[1].needs_defense:
            out["defense"] = {"name": self.s.defense.name, "params": self.s.defense.params, "f": self.s.defense.f}
        return out

    def describe(self) -> list[str]:
        lines = []
        if self.collusion is not None:
            dial = self.collusion_address
            dial = f"port {dial[1:]} of the host they reach the orchestrator at" if dial.startswith(":") else dial
            lines.append(f"collusion service for {len(self.group)} Byzantine nodes on {self.collusion.address}"
                         + (f" (nodes dial {dial})" if dial != self.collusion.address else ""))
        if self.view is not None:
            lines.append(f"[bold red]{WARNING}[/] on {self.coord.ingest_address or 'the orchestrator address'}")
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
