"""Hypothesis strategies over the wire messages of ``byzfed.v1``.

:func:`messages` walks a message's descriptor, so every field is fuzzed, including
fields added to the protocol later: each field is either kept from a valid message
(three times in four, so cases get past the first check) or drawn from its type's
strategy (boundary integers, NaN/inf/subnormal doubles, empty/odd/huge strings,
unknown enum values, absent optional fields), or from a per-field override that
knows what the field means (sessions of real nodes, the open round, ...).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from proto.byzfed.v1 import federation_pb2 as pb

from .live import LiveFederation, Node

I32, I64, U32, U64 = (-(1 << 31), (1 << 31) - 1), (-(1 << 63), (1 << 63) - 1), (0, (1 << 32) - 1), (0, (1 << 64) - 1)


def ints(lo: int, hi: int, near: tuple[int, ...] = ()) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (0, 1, -1, 2, lo, lo + 1, hi, hi - 1, *near) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(-1000, 1000).filter(lambda v: lo <= v <= hi))


DOUBLES = st.one_of(
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, -5e-324, 1.7976931348623157e308,
                     -1.7976931348623157e308, 1e-300, 1e300, 2.0 ** 53, 2.0 ** 63, 2.0 ** 64]),
    st.floats(allow_nan=True, allow_infinity=True))
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "\x00", "\x00" * 8, "\u202e", "\ufeff", "🙂" * 3, "a\nb", "%s%n", "../../etc/passwd"]),
    st.sampled_from([100, 1_000, 17_000, 70_000]).map(lambda n: "x" * n))
"""Strings: short and odd ones, and long ones (17 000 chars: past gRPC's 16 KiB trailer limit if echoed)."""
BYTES = st.one_of(st.binary(max_size=48), st.sampled_from([b"", b"\x00" * 16, b"\xff" * 16]))
BOOLS = st.booleans()


def scalar(f: FD) -> st.SearchStrategy[Any]:
    t = f.type
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return ints(*I32)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return ints(*I64)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return ints(*U32)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return ints(*U64)
    if t == FD.TYPE_DOUBLE:
        return DOUBLES
    if t == FD.TYPE_FLOAT:
        return FLOATS
    if t == FD.TYPE_BOOL:
        return BOOLS
    if t == FD.TYPE_STRING:
        return TEXT
    if t == FD.TYPE_BYTES:
        return BYTES
    if t == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers travel too
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), ints(*I32))
    raise AssertionError(f"no strategy for field type {t} of {f.full_name}")


@st.composite
def messages(draw, cls: type, valid: Any = None, overrides: Optional[Mapping[str, Any]] = None,
             keep: int = 3) -> Any:
    """A ``cls`` message: each field kept from ``valid`` (``keep`` times in ``keep + 1``;
    always drawn without ``valid``) or drawn: from ``overrides[name]`` (a strategy, or
    a mapping of overrides for a message field), else from its type. Shrinks towards
    ``valid``."""
    overrides = overrides or {}
    msg = cls()
    if valid is not None:
        msg.CopyFrom(valid)
    for f in cls.DESCRIPTOR.fields:
        if valid is not None and draw(st.integers(0, keep)) != keep:
            continue
        over = overrides.get(f.name)
        if f.type == FD.TYPE_MESSAGE and not f.is_repeated:
            if isinstance(over, st.SearchStrategy):
                value = draw(st.one_of(st.none(), over))
            else:
                sub = getattr(valid, f.name) if valid is not None and valid.HasField(f.name) else None
                value = draw(st.one_of(st.none(), messages(GetMessageClass(f.message_type), sub, over, keep)))
            if value is None:
                msg.ClearField(f.name)
            else:
                getattr(msg, f.name).CopyFrom(value)
            continue
        values = over if isinstance(over, st.SearchStrategy) else (
            st.lists(messages(GetMessageClass(f.message_type), None, over)) if f.type == FD.TYPE_MESSAGE
            else st.lists(scalar(f), max_size=6) if f.is_repeated else scalar(f))
        if f.has_presence and not f.is_repeated:  # proto3 `optional` (or a oneof member): may be absent
            values = st.one_of(st.none(), values)
        value = draw(values)
        if value is None:
            msg.ClearField(f.name)
        elif f.is_repeated:
            msg.ClearField(f.name)
            if f.type == FD.TYPE_MESSAGE:
                for v in value:
                    getattr(msg, f.name).add().CopyFrom(v)
            else:
                getattr(msg, f.name).extend(value)
        else:
            setattr(msg, f.name, value)
    return msg


# ----- sessions ----------------------------------------------------------------------------------
def _tweak(s: str, how: int) -> str:
    """A near miss of a secret: one character changed, cut, extended, cased, padded."""
    if not s:
        return "x"
    i = how % len(s)
    c = chr(ord(s[i]) + 1) if ord(s[i]) + 1 < 0xD800 else "a"
    out = [s[:i] + c + s[i + 1:], s[:-1], s + "0", s.upper(), " " + s, s + "\x00", s[:i]][how % 7]
    return out if out and out != s else s + "x"


def sessions(valid: list[Node], others: list[Node]) -> st.SearchStrategy[pb.Session]:
    """Sessions: the real ones of ``valid``, and near misses built from every node's
    (``valid + others``) id and token: a wrong or tweaked token, another node's token,
    a random id, empty parts, random text."""
    every = valid + others
    nodes = st.sampled_from(every)
    real = [st.sampled_from(valid).map(lambda n: n.session())] if valid else []
    return st.one_of(
        *real,
        st.tuples(nodes, st.integers(0, 63)).map(lambda t: pb.Session(node_id=t[0].node_id,
                                                                        session_token=_tweak(t[0].token, t[1]))),
        st.tuples(nodes, st.integers(0, 63)).map(lambda t: pb.Session(node_id=_tweak(t[0].node_id, t[1]),
                                                                        session_token=t[0].token)),
        st.tuples(nodes, nodes).filter(lambda t: t[0] is not t[1]).map(
            lambda t: pb.Session(node_id=t[0].node_id, session_token=t[1].token)),
        st.tuples(nodes, TEXT).map(lambda t: pb.Session(node_id=t[0].node_id, session_token=t[1])),
        st.tuples(TEXT, nodes).map(lambda t: pb.Session(node_id=t[0], session_token=t[1].token)),
        nodes.map(lambda n: pb.Session(session_token=n.token)),
        nodes.map(lambda n: pb.Session(node_id=n.node_id)),
        messages(pb.Session),
    )


def is_live_session(fed: LiveFederation, s: pb.Session, among: list[Node]) -> bool:
    return any(s.node_id == n.node_id and s.session_token == n.token for n in among)


# ----- requests ------------------------------------------------------------------------------------
def join_requests(fed: LiveFederation) -> st.SearchStrategy[pb.JoinRequest]:
    """Join requests around the spares' real ones: roster and unknown names, right and
    near-miss secrets and tokens, every other field from its type."""
    from .live import FUZZ_SAMPLES, PROTOCOL, TOKEN

    names = [n.name for n in fed.spares] + fed.late_names + ["anchor-000", "fz-000"]
    secrets = [n.secret for n in fed.spares]
    valid = pb.JoinRequest(credentials=pb.Credentials(node_name=fed.spares[0].name, node_secret=fed.spares[0].secret,
                                                      federation_token=TOKEN),
                           num_samples=FUZZ_SAMPLES, device="cpu", cpu_cores=2, protocol_version=PROTOCOL)
    near = lambda pool: st.one_of(st.sampled_from(pool), st.tuples(st.sampled_from(pool), st.integers(0, 63)).map(
        lambda t: _tweak(*t)), TEXT)
    return st.one_of(
        messages(pb.JoinRequest, valid, {"credentials": {"node_name": near(names), "node_secret": near(secrets),
                                                         "federation_token": near([TOKEN])},
                                         "protocol_version": ints(*I32, near=(1, 2, 3, PROTOCOL))}),
        messages(pb.JoinRequest))


def heartbeat_requests(fed: LiveFederation) -> st.SearchStrategy[pb.HeartbeatRequest]:
    live = [fed.anchor, *fed.fuzz[:4], *fed.spares]
    valid = pb.HeartbeatRequest(session=fed.anchor.session())
    rounds = st.one_of(st.sampled_from([fed.round_id, fed.round_id + 1, fed.round_id - 1]), ints(*I64))
    return st.one_of(
        messages(pb.HeartbeatRequest, valid, {"session": sessions(live, []), "received_round": rounds}, keep=1),
        messages(pb.HeartbeatRequest))


def leave_requests(fed: LiveFederation) -> st.SearchStrategy[pb.LeaveRequest]:
    """Only the spares may really leave (they are re-joined afterwards); every other
    node's session appears only as a near miss."""
    valid = pb.LeaveRequest(session=fed.spares[1].session(), reason="done")
    return st.one_of(
        messages(pb.LeaveRequest, valid, {"session": sessions(fed.spares[1:], [fed.anchor, *fed.fuzz[:4]])}, keep=1),
        messages(pb.LeaveRequest))


IDLE_WAITS = st.one_of(st.sampled_from([math.nan, -math.nan, -math.inf, -1.0, -0.0, 0.0, 5e-324, -1e308, -5e-324]),
                       st.floats(0.0, 0.25))
"""Waits for a node with nothing to do: it long-polls for up to that long, so only short ones (and
the ones that mean "no wait", or nothing at all: NaN) run in the default budget."""
LONG_WAITS = st.sampled_from([math.inf, 1e308, 1e18, 2.0 ** 63, 25.0])


def get_task_requests(fed: LiveFederation, long_waits: bool = False
                      ) -> st.SearchStrategy[tuple[pb.GetTaskRequest, str]]:
    """``(request, kind)``: ``busy`` (a node with a task: answered at once, whatever the
    wait), ``idle`` (a real session with nothing to do: a short or meaningless wait) or
    ``invalid`` (a near-miss session: refused at once, whatever the wait)."""
    idle_waits = st.one_of(IDLE_WAITS, LONG_WAITS) if long_waits else IDLE_WAITS
    busy = st.tuples(st.sampled_from(fed.busy()), DOUBLES).map(
        lambda t: (pb.GetTaskRequest(session=t[0].session(), wait_seconds=t[1]), "busy"))
    idle = st.tuples(st.sampled_from(fed.idle()), idle_waits).map(
        lambda t: (pb.GetTaskRequest(session=t[0].session(), wait_seconds=t[1]), "idle"))
    live = [*fed.busy(), *fed.idle()]
    invalid = st.tuples(sessions([], live), DOUBLES).filter(lambda t: not is_live_session(fed, t[0], live)).map(
        lambda t: (pb.GetTaskRequest(session=t[0], wait_seconds=t[1]), "invalid"))
    return st.one_of(busy, idle, invalid)


# ----- uploads ---------------------------------------------------------------------------------------
def payloads(fed: LiveFederation, node: Node) -> st.SearchStrategy[bytes]:
    """The node's honest delta mostly; else one with NaN/Inf/huge/subnormal entries, all
    zeros, random bytes, or of another length."""
    import numpy as np

    honest = fed.payload_for(node)
    d = fed.d

    def poke(t):
        idx, value = t
        a = np.frombuffer(honest, dtype="<f4").copy()
        a[idx % d] = value
        return a.tobytes()

    specials = st.sampled_from([math.nan, math.inf, -math.inf, 3.4028235e38, -3.4028235e38, 1e-45, 0.0, -0.0])
    return st.one_of(
        st.just(honest), st.just(honest), st.just(honest),
        st.tuples(st.integers(0, d - 1), specials).map(poke),
        st.just(bytes(4 * d)),
        st.binary(min_size=4 * d, max_size=4 * d),
        st.sampled_from([honest[:-4], honest + honest[:4], honest[:-1], honest[: 4 * d // 2], b""]))


@st.composite
def chunk_sequences(draw, payload: bytes, header: pb.UpdateHeader, foreign: pb.UpdateHeader) -> list[pb.UpdateChunk]:
    """The payload cut at drawn points (an honest stream in other chunks), then up to three
    edits: drop, duplicate or swap chunks, insert random data, an empty chunk, a chunk
    with no payload, the header again or another node's header, or stop early."""
    n = len(payload)
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=5))))
    bounds = [0, *cuts, n]
    chunks = [pb.UpdateChunk(data=payload[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    edits = draw(st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap", "random", "empty_data", "no_payload",
                                                     "header", "foreign", "cut"]),
                                    st.integers(0, 1 << 16), st.binary(max_size=32)), max_size=3))
    for op, k, blob in edits:
        m = len(chunks)
        if op == "drop" and m:
            del chunks[k % m]
        elif op == "dup" and m:
            chunks.insert(k % (m + 1), chunks[k % m])
        elif op == "swap" and m >= 2:
            i, j = k % m, (k // m) % m
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "random":
            chunks.insert(k % (m + 1), pb.UpdateChunk(data=blob))
        elif op == "empty_data":
            chunks.insert(k % (m + 1), pb.UpdateChunk(data=b""))
        elif op == "no_payload":
            chunks.insert(k % (m + 1), pb.UpdateChunk())
        elif op == "header":
            chunks.insert(k % (m + 1), pb.UpdateChunk(header=header))
        elif op == "foreign":
            chunks.insert(k % (m + 1), pb.UpdateChunk(header=foreign))
        elif op == "cut":
            del chunks[k % (m + 1):]
    return chunks


@st.composite
def upload_cases(draw, fed: LiveFederation, node: Node, others: list[Node]) -> tuple[pb.UpdateHeader, list]:
    """``(header, chunks)`` of one upload by ``node``: every header field kept from the
    honest one or drawn (near misses of the session, round, version, layout hash,
    nonce, sample count, dtype, byte count and CRC; anything else from its type), the
    payload and its chunk sequence from :func:`payloads` and :func:`chunk_sequences`."""
    from .live import FUZZ_SAMPLES

    payload = draw(payloads(fed, node), label="payload")
    honest = fed.valid_header(node, payload)
    foreign = fed.valid_header(others[0], payload) if others else honest
    near = lambda v: st.one_of(st.sampled_from([v, v + 1, v - 1, v + (1 << 32), -v - 1]), ints(*I64))
    texts = lambda v: st.one_of(st.sampled_from([v, "", v[:-1], v + "0", v.upper(), v + "\x00"]), TEXT)
    overrides = {
        "session": sessions([node], others),
        "round": near(honest.round), "model_version": near(honest.model_version),
        "layout_hash": texts(honest.layout_hash), "upload_nonce": texts(getattr(honest, "upload_nonce", "")),
        "num_samples": ints(*I64, near=(FUZZ_SAMPLES, 1 << 31)),
        "tensor": {"dtype": st.one_of(st.sampled_from(["float32", "float64", "float16", "int8", "", "FLOAT32",
                                                       "float32 ", "<f4"]), TEXT),
                   "num_bytes": ints(*I64, near=(honest.tensor.num_bytes, honest.tensor.num_bytes - 4,
                                                 honest.tensor.num_bytes + 4, honest.tensor.num_bytes + 1, 1 << 62)),
                   "crc32": ints(*U32, near=(honest.tensor.crc32, honest.tensor.crc32 ^ 1)),
                   "shape": st.one_of(st.just([fed.d]), st.lists(ints(*I64, near=(fed.d,)), max_size=10))},
    }
    header = draw(messages(pb.UpdateHeader, honest, overrides, keep=6), label="header")
    chunks = draw(chunk_sequences(payload, header, foreign), label="chunks")
    return header, chunks
