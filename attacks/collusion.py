"""Collusion service: the Byzantine nodes of one group share their benign deltas.

A non-omniscient attack that needs ``colluders`` (ALIE, IPM, Min-Max, Fang, ...)
estimates the honest statistics from the benign deltas of its own group. Each
colluder of a round

1. ``announce(r)``s itself as soon as it has the task (before training), so the
   group knows whom to wait for;
2. ``post(r, delta)``s its benign delta after local training;
3. ``fetch(r)``es the group's deltas: the call returns once every member that
   announced round ``r`` has posted, or at the timeout with what arrived.

Rows come back sorted by member name, so every colluder computes bit-identical
statistics and crafts the same row.

Wire format. ``attacks`` imports nothing of ``proto`` (see the package
docstring), so this service uses gRPC generic handlers over raw bytes with a
small explicit framing instead of a ``.proto``. Every gRPC message is one frame:

* ``b"H" + UTF-8 JSON``: a header (an object);
* ``b"D" + bytes``: a chunk of a float32 little-endian tensor.

Methods of ``byzfed.attacks.Collusion``:

* ``Announce`` (unary): ``H{token, member, round}`` -> ``H{announced}``;
* ``PostDelta`` (client stream): ``H{token, member, round, d, crc32}``, ``D``... -> ``H{posted}``;
* ``FetchDeltas`` (server stream): ``H{token, member, round, timeout}`` ->
  ``H{round, members, rows, d, crc32}``, ``D``... (the ``[rows, d]`` matrix, row-major).

No pickle; sizes, CRC-32 and finiteness are checked before anything is stored.

Security posture: the service is started by the launcher for one scenario's
Byzantine group, listens on the orchestrator's host (loopback by default) and
accepts only callers that present the group token (compared in constant time)
and a member name of the group. It knows nothing of the federation and holds
only the colluders' own deltas of the last few rounds.
"""
from __future__ import annotations

import hmac
import json
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import grpc
import numpy as np
import torch
from torch import Tensor

SERVICE = "byzfed.attacks.Collusion"
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 << 20
MAX_HEADER_BYTES = 64 << 10
KEEP_ROUNDS = 4
MAX_WAIT_SECONDS = 600.0


class CollusionError(RuntimeError):
    """A collusion call failed (refused, malformed, or the service is unreachable)."""


# --------------------------------------------------------------------------- framing

def header_frame(obj: dict) -> bytes:
    return b"H" + json.dumps(obj, separators=(",", ":")).encode()


def data_frames(buf: memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    for start in range(0, len(buf), chunk_bytes):
        yield b"D" + bytes(buf[start:start + chunk_bytes])


def parse_header(frame: bytes) -> dict:
    if not frame or frame[:1] != b"H":
        raise ValueError("expected a header frame (b'H' + JSON)")
    if len(frame) > MAX_HEADER_BYTES:
        raise ValueError(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj = json.loads(frame[1:].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("header must be a JSON object")
    return obj


def tensor_payload(t: Tensor) -> memoryview:
    """Little-endian float32 bytes of ``t`` (flattened, on CPU)."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return memoryview(arr.reshape(-1)).cast("B")


def assemble(frames: Iterable[bytes], num_bytes: int, crc: int) -> np.ndarray:
    """Collect ``D`` frames into exactly ``num_bytes`` bytes with CRC-32 ``crc``."""
    buf = bytearray(num_bytes)
    view, got = memoryview(buf), 0
    for frame in frames:
        if frame[:1] != b"D":
            raise ValueError("expected a data frame (b'D' + bytes)")
        end = got + len(frame) - 1
        if end > num_bytes:
            raise ValueError(f"stream carries more than the declared {num_bytes} bytes")
        view[got:end] = frame[1:]
        got = end
    if got != num_bytes:
        raise ValueError(f"stream ended after {got} of {num_bytes} declared bytes")
    if zlib.crc32(view) & 0xFFFFFFFF != crc:
        raise ValueError("CRC-32 of the received bytes does not match the header")
    return np.frombuffer(buf, dtype="<f4")


def _int(h: dict, key: str, lo: int = 0) -> int:
    v = h.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"header field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


# --------------------------------------------------------------------------- server

@dataclass
class _Round:
    announced: set[str] = field(default_factory=set)
    expected: set[str] = field(default_factory=set)
    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    fetches: list[tuple[str, int]] = field(default_factory=list)


class CollusionService:
    """The group's shared board, transport-free (the gRPC handlers adapt to it)."""

    def __init__(self, group: Iterable[str], token: str, keep_rounds: int = KEEP_ROUNDS) -> None:
        self.group = frozenset(group)
        if not self.group:
            raise ValueError("a collusion group needs at least one member")
        if len(token) < 16:
            raise ValueError("the group token must be at least 16 characters")
        self._token = token.encode()
        self.keep_rounds = keep_rounds
        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}
        self.history: dict[int, dict] = {}  # per-round counts, for metrics and tests

    def check(self, h: dict) -> tuple[str, int]:
        """Authenticate a header: the group token and a member of the group."""
        token = h.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            raise PermissionError("collusion group token is wrong")
        member = h.get("member")
        if member not in self.group:
            raise PermissionError(f"{member!r} is not a member of this collusion group")
        return member, _int(h, "round")

    def _round(self, r: int) -> _Round:
        rnd = self._rounds.get(r)
        if rnd is None:
            rnd = self._rounds[r] = _Round()
            for old in [k for k in self._rounds if k <= r - self.keep_rounds]:
                del self._rounds[old]
        return rnd

    def _record(self, r: int, rnd: _Round) -> None:
        self.history[r] = {"announced": sorted(rnd.announced), "posted": sorted(rnd.deltas),
                           "fetches": [list(f) for f in rnd.fetches]}

    def announce(self, member: str, r: int) -> int:
        with self._cond:
            rnd = self._round(r)
            rnd.announced.add(member)
            self._record(r, rnd)
            self._cond.notify_all()
            return len(rnd.announced)

    def expect(self, r: int, selected: Iterable[str]) -> int:
        """The members selected for round ``r`` (told by the orchestrator when it opens the
        round): a fetch also waits for them, so a colluder that trains fast does not fetch
        before a slower one has even announced. Returns how many are expected."""
        with self._cond:
            rnd = self._round(r)
            rnd.expected = set(selected) & self.group
            self._cond.notify_all()
            return len(rnd.expected)

    def post(self, member: str, r: int, row: np.ndarray) -> int:
        if not np.isfinite(row).all():
            raise ValueError("a benign delta must be finite")
        with self._cond:
            rnd = self._round(r)
            for other in rnd.deltas.values():
                if other.shape != row.shape:
                    raise ValueError(f"delta has d={row.shape[0]}, the group's round {r} has d={other.shape[0]}")
            rnd.announced.add(member)
            rnd.deltas[member] = row
            self._record(r, rnd)
            self._cond.notify_all()
            return len(rnd.deltas)

    def fetch(self, member: str, r: int, timeout: float) -> tuple[list[str], np.ndarray | None]:
        """Wait until every announced or expected (:meth:`expect`) member posted round ``r``
        (or ``timeout``); the members that posted (sorted) and their ``[k, d]`` rows (None
        if none)."""
        end = time.monotonic() + min(max(timeout, 0.0), MAX_WAIT_SECONDS)
        with self._cond:
            while True:
                rnd = self._round(r)
                left = end - time.monotonic()
                if (rnd.deltas and (rnd.announced | rnd.expected) <= set(rnd.deltas)) or left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            members = sorted(rnd.deltas)
            rows = np.stack([rnd.deltas[m] for m in members]) if members else None
            rnd.fetches.append((member, len(members)))
            self._record(r, rnd)
            return members, rows


def _handlers(service: CollusionService) -> grpc.GenericRpcHandler:
    def guard(context, fn):
        try:
            return fn()
        except PermissionError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def announce(request: bytes, context) -> bytes:
        def go():
            member, r = service.check(parse_header(request))
            return header_frame({"announced": service.announce(member, r)})
        return guard(context, go)

    def post(request_iterator, context) -> bytes:
        def go():
            h = parse_header(next(request_iterator, b""))
            member, r = service.check(h)
            d = _int(h, "d", lo=1)
            row = assemble(request_iterator, 4 * d, _int(h, "crc32"))
            return header_frame({"posted": service.post(member, r, row)})
        return guard(context, go)

    def fetch(request: bytes, context) -> Iterator[bytes]:
        h = guard(context, lambda: parse_header(request))
        member, r = guard(context, lambda: service.check(h))
        timeout = h.get("timeout", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header field 'timeout' must be a number")
        members, rows = service.fetch(member, r, float(timeout))
        if rows is None:
            yield header_frame({"round": r, "members": [], "rows": 0, "d": 0, "crc32": 0})
            return
        buf = memoryview(rows.astype("<f4", copy=False).reshape(-1)).cast("B")
        yield header_frame({"round": r, "members": members, "rows": rows.shape[0], "d": rows.shape[1],
                            "crc32": zlib.crc32(buf) & 0xFFFFFFFF})
        yield from data_frames(buf)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Announce": grpc.unary_unary_rpc_method_handler(announce),
        "PostDelta": grpc.stream_unary_rpc_method_handler(post),
        "FetchDeltas": grpc.unary_stream_rpc_method_handler(fetch),
    })


def _options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class CollusionServer:
    """A running collusion service: ``address``, ``service`` (its board) and ``stop()``."""

    def __init__(self, group: Iterable[str], token: str, host: str = "127.0.0.1", port: int = 0,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        """``credentials``: the run's TLS (``grpc.ssl_server_credentials``); None: plaintext."""
        self.service = CollusionService(group, token)
        # Every member may block in FetchDeltas at once; leave room for posts.
        workers = 2 * len(self.service.group) + 4
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="collusion"),
                                   options=_options())
        self._server.add_generic_rpc_handlers((_handlers(self.service),))
        bound = (self._server.add_insecure_port(f"{host}:{port}") if credentials is None
                 else self._server.add_secure_port(f"{host}:{port}", credentials))
        if bound == 0:
            raise RuntimeError(f"collusion service cannot listen on {host}:{port}")
        self._server.start()
        self.address = f"{host}:{bound}"

    def stop(self, grace: float = 0.5) -> None:
        self._server.stop(grace)


# --------------------------------------------------------------------------- client

class CollusionClient:
    """One colluder's handle on the service."""

    def __init__(self, address: str, token: str, member: str,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """``credentials``: the run's TLS (``grpc.ssl_channel_credentials``); None: plaintext."""
        self.address, self._token, self.member = address, token, member
        self._channel = (grpc.insecure_channel(address, options=_options()) if credentials is None
                         else grpc.secure_channel(address, credentials, options=_options()))
        self._announce = self._channel.unary_unary(f"/{SERVICE}/Announce")
        self._post = self._channel.stream_unary(f"/{SERVICE}/PostDelta")
        self._fetch = self._channel.unary_stream(f"/{SERVICE}/FetchDeltas")

    def _head(self, r: int, **extra) -> dict:
        return {"token": self._token, "member": self.member, "round": int(r), **extra}

    def _call(self, what: str, fn):
        try:
            return fn()
        except grpc.RpcError as e:
            raise CollusionError(f"collusion {what} failed: {e.code().name} {e.details()}") from None

    def announce(self, r: int, timeout: float = 10.0) -> int:
        reply = self._call("announce", lambda: self._announce(header_frame(self._head(r)), timeout=timeout))
        return int(parse_header(reply)["announced"])

    def post(self, r: int, delta: Tensor, timeout: float = 60.0) -> int:
        buf = tensor_payload(delta)
        head = self._head(r, d=len(buf) // 4, crc32=zlib.crc32(buf) & 0xFFFFFFFF)

        def frames() -> Iterator[bytes]:
            yield header_frame(head)
            yield from data_frames(buf)
        reply = self._call("post", lambda: self._post(frames(), timeout=timeout))
        return int(parse_header(reply)["posted"])

    def fetch(self, r: int, timeout: float = 10.0) -> tuple[list[str], Tensor | None]:
        """The members that posted round ``r`` and their ``[k, d]`` deltas (None if none)."""
        def go():
            stream = self._fetch(header_frame(self._head(r, timeout=timeout)), timeout=timeout + 60.0)
            h = parse_header(next(stream))
            rows, d = _int(h, "rows"), _int(h, "d")
            if rows == 0:
                return [], None
            arr = assemble(stream, 4 * rows * d, _int(h, "crc32"))
            return list(h["members"]), torch.from_numpy(arr.copy()).reshape(rows, d)
        try:
            return self._call("fetch", go)
        except ValueError as exc:
            raise CollusionError(f"collusion fetch: malformed reply: {exc}") from None

    def close(self) -> None:
        self._channel.close()
