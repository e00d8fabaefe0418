"""Fuzzing PushUpdate against the real server on 127.0.0.1.

Each batch sends up to ``FUZZ_NODES`` uploads at once, one per selected node, into a
round that already holds the anchor's honest upload, then checks (``LiveFederation.push_batch``):

* every call got an allowed status (never INTERNAL or UNKNOWN) before its deadline;
* an upload the test judges invalid (undecodable message, no header first, a second
  header, wrong session, round, version, layout hash, nonce, dtype, byte count, CRC,
  non-finite values, too short or too long) was refused, an honest one (perhaps cut
  into other chunks) was accepted, and an accepted one's row is exactly what it sent;
* nothing else changed: the anchor's row, the other accepted uploads, the global
  weights and version; nothing is left in flight; an honest client is still served.

Then a fresh round opens (with a fresh honest upload of the anchor) for the next batch.
"""
from __future__ import annotations

import random

from hypothesis import given, strategies as st

from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb

from .live import ECHOED, LiveFederation, Node, summarize
from .mutate import mutate_bytes, mutate_list, string_paths
from .strategies import upload_cases

FUZZ_NODES = 64
CHUNK_STRINGS = string_paths(pb.UpdateChunk.DESCRIPTOR)


def test_upload_fields(fed, budget):
    """Structured: hypothesis over every UpdateHeader field, the payload and the chunk sequence."""
    @budget.seeded
    @budget.settings(80)
    @given(data=st.data())
    def prop(data):
        k = data.draw(st.integers(1, 12), label="uploads at once")
        others = fed.fuzz[-3:]
        cases = []
        for node in fed.fuzz[:k]:
            header, chunks = data.draw(upload_cases(fed, node, others), label=node.name)
            cases.append((node, [pb.UpdateChunk(header=header).SerializeToString(),
                                 *(c.SerializeToString() for c in chunks)]))
        problems = fed.push_batch(cases)
        assert not problems, "\n".join(problems)

    prop()


# ----- byte-level ------------------------------------------------------------------------------------
def _tweak(rng: random.Random, s: str) -> str:
    return rng.choice(["", s[:-1], s + "0", s.upper() if s.upper() != s else s + "X", "x" * 200, s + "\x00"])


def mutate_header(rng: random.Random, fed: LiveFederation, node: Node, h: pb.UpdateHeader) -> str:
    nb, crc = h.tensor.num_bytes, h.tensor.crc32
    what = rng.choice(["round", "model_version", "layout_hash", "num_samples", "dtype", "num_bytes", "crc32", "shape",
                       "token", "node_id", "no_session", "no_tensor", *(["echo"] * 2 * bool(ECHOED))])
    if what in ("round", "model_version"):
        v = getattr(h, what)
        setattr(h, what, rng.choice([v + 1, v - 1, -1, (1 << 63) - 1, -(1 << 63), v + (1 << 32)]))
        return f"{what} = {getattr(h, what)}"
    if what == "layout_hash":
        h.layout_hash = _tweak(rng, h.layout_hash)
    elif what == "num_samples":
        h.num_samples = rng.choice([0, -1, -(1 << 63), (1 << 63) - 1, 1, 1 << 31])
    elif what == "dtype":
        h.tensor.dtype = rng.choice(["float64", "", "FLOAT32", "float32 ", "int8", "float16", "<f4", "x" * 100])
    elif what == "num_bytes":
        h.tensor.num_bytes = rng.choice([0, -4, nb - 4, nb + 4, nb + 1, 1 << 62, (1 << 63) - 1, -(1 << 63), 4])
    elif what == "crc32":
        h.tensor.crc32 = rng.choice([crc ^ 1, 0, (1 << 32) - 1, rng.getrandbits(32)])
    elif what == "shape":
        del h.tensor.shape[:]
        h.tensor.shape.extend(rng.choice([[], [fed.d, 1], [-1], [(1 << 63) - 1] * 9, [fed.d + 1], [0]]))
    elif what == "token":
        h.session.session_token = _tweak(rng, h.session.session_token)
    elif what == "node_id":
        other = rng.choice([n for n in fed.fuzz if n is not node])
        h.session.node_id = other.node_id  # another node's id with this node's token
    elif what == "no_session":
        h.ClearField("session")
    elif what == "no_tensor":
        h.ClearField("tensor")
    else:
        name = rng.choice(ECHOED)
        setattr(h, name, _tweak(rng, getattr(h, name)))
        return f"{name} = {getattr(h, name)[:20]!r}"
    return f"header {what} changed"


def mutate_payload(rng: random.Random, payload: bytes, h: pb.UpdateHeader) -> tuple[bytes, str]:
    import numpy as np

    what = rng.choice(["flip", "nan", "inf", "zeros", "short", "long", "short_consistent", "long_consistent", "empty"])
    a = bytearray(payload)
    if what == "flip":
        j = rng.randrange(len(a))
        a[j] ^= 1 << rng.randrange(8)
        return bytes(a), f"payload bit flipped at byte {j} (CRC stale)"
    if what in ("nan", "inf", "zeros"):
        v = np.frombuffer(payload[:len(payload) // 4 * 4], dtype="<f4").copy()
        if v.size == 0:
            return payload, "no float to poison"
        if what == "zeros":
            v[:] = 0
        else:
            v[rng.randrange(v.size)] = np.nan if what == "nan" else rng.choice([np.inf, -np.inf])
        out = v.tobytes()
        h.tensor.crc32 = codec.crc32(out)
        return out, f"payload {what} (CRC matches)"
    if what == "short":
        k = rng.choice([1, 4, len(payload) // 2, len(payload) - 1])
        return payload[:-k], f"payload {k} bytes short (header unchanged)"
    if what == "long":
        extra = rng.randbytes(rng.choice([1, 4, 1024]))
        return payload + extra, f"payload {len(extra)} bytes long (header unchanged)"
    if what == "empty":
        return b"", "no payload"
    out = payload[:-4] if what == "short_consistent" else payload + payload[:4]
    h.tensor.num_bytes, h.tensor.crc32 = len(out), codec.crc32(out)
    del h.tensor.shape[:]
    h.tensor.shape.append(len(out) // 4)
    return out, f"payload of {len(out)} bytes, header consistent with it"


def mutated_upload(rng: random.Random, fed: LiveFederation, node: Node, i: int) -> tuple[list[bytes], str]:
    """An honest upload of ``node`` with 1-3 mutations of its header fields, its payload,
    the order of its messages, or the bytes of one message."""
    payload = fed.payload_for(node)
    h = fed.valid_header(node, payload)
    order = ["header", "payload", "stream", "bytes"]
    kinds = sorted(rng.choices(order, weights=[2, 2, 2, 4], k=rng.choice([1, 1, 2, 3])), key=order.index)
    if kinds.count("payload") > 1:  # one payload edit per case (each assumes the honest payload)
        kinds = [k for k in kinds if k != "payload"] + ["payload"]
        kinds.sort(key=order.index)
    why = []
    for k in kinds:
        if k == "header":
            why.append(mutate_header(rng, fed, node, h))
        elif k == "payload":
            payload, w = mutate_payload(rng, payload, h)
            why.append(w)
    size = rng.choice([4 * fed.d, 1024, 1000, 4096, 7, rng.randint(1, 4 * fed.d)])
    msgs = [pb.UpdateChunk(header=h).SerializeToString()]
    msgs += [pb.UpdateChunk(data=payload[j:j + size]).SerializeToString() for j in range(0, len(payload), size)]
    foreign = fed.fuzz[(i + 1) % len(fed.fuzz)]
    for k in kinds:
        if k == "stream":
            extras = [pb.UpdateChunk(data=b"").SerializeToString(), pb.UpdateChunk(header=h).SerializeToString(),
                      pb.UpdateChunk(header=fed.valid_header(foreign, payload)).SerializeToString(),
                      pb.UpdateChunk(data=rng.randbytes(rng.randint(1, 64))).SerializeToString()]
            msgs, w = mutate_list(rng, msgs, lambda: rng.choice(extras))
            why.append(w)
        elif k == "bytes" and msgs:
            j = 0 if rng.random() < 0.5 else rng.randrange(len(msgs))
            msgs[j], w = mutate_bytes(rng, msgs[j], CHUNK_STRINGS)
            why.append(f"message {j}: {w}")
    return msgs, "; ".join(why)


def test_upload_bytes(fed, budget):
    """Byte-level: mutated honest streams (see :func:`mutated_upload`), in batches of
    ``FUZZ_NODES`` at once."""
    rng = budget.rng("upload")
    planned = len(budget.cases(1536))
    deadline = budget.deadline()
    problems: list[str] = []
    done = 0
    while done < planned and not budget.out_of_time(deadline, done, planned):
        batch = []
        for i, node in enumerate(fed.fuzz[:planned - done]):
            msgs, why = mutated_upload(rng, fed, node, i)
            batch.append((node, msgs, f"case {done + i} ({node.name}): {why}"))
        problems += fed.push_batch([(n, m) for n, m, _ in batch], label=lambda j: batch[j][2])
        done += len(batch)
    print(f"PushUpdate: {done} byte-level cases")
    assert not problems, summarize(problems, done)
