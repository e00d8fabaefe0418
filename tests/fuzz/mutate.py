"""Byte-level mutations of serialized protobuf messages and of upload streams.

Each mutation takes a ``random.Random`` and returns the new value with a short label
of what it did, so a failing case can be read (and replayed from the seed).
"""
from __future__ import annotations

import random
import struct
from typing import Callable, Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor as FD

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"ok\x80", b"node-\xff"]
"""Invalid UTF-8: a lone continuation byte, truncated and overlong sequences, a surrogate, > U+10FFFF."""


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def nested(path: Sequence[int], payload: bytes) -> bytes:
    """``payload`` as the length-delimited field at ``path`` (field numbers, outermost first):
    appended to a message, protobuf merges it into the existing sub-messages."""
    out = payload
    for number in reversed(path):
        out = length_delimited(number, out)
    return out


def string_paths(desc: Descriptor, prefix: tuple[int, ...] = (), depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths to every string field under ``desc`` (these must hold valid UTF-8)."""
    out = []
    for f in desc.fields:
        if f.type == FD.TYPE_STRING:
            out.append(prefix + (f.number,))
        elif f.type == FD.TYPE_MESSAGE and depth < 4:
            out += string_paths(f.message_type, prefix + (f.number,), depth + 1)
    return out


def _random_field(rng: random.Random) -> bytes:
    number = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 100, 2047, 536870911])
    wire = rng.choice([VARINT, I64, LEN, I32, SGROUP, EGROUP, 6, 7])
    if wire == VARINT:
        return tag(number, wire) + varint(rng.choice([0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, rng.getrandbits(64)]))
    if wire == I64:
        return tag(number, wire) + rng.choice([struct.pack("<d", float("nan")), struct.pack("<d", float("inf")),
                                               rng.randbytes(8)])
    if wire == I32:
        return tag(number, wire) + rng.randbytes(4)
    if wire == LEN:
        return length_delimited(number, rng.choice([b"", rng.randbytes(rng.randint(1, 40)), rng.choice(BAD_UTF8)]))
    return tag(number, wire) + rng.randbytes(rng.randint(0, 4))  # groups and the reserved wire types 6, 7


def mutate_bytes(rng: random.Random, b: bytes, strings: Sequence[tuple[int, ...]] = ()) -> tuple[bytes, str]:
    """One byte-level mutation of a serialized message: flip, set, insert, delete,
    truncate, duplicate, append an unknown or a wrongly typed field, put invalid UTF-8
    into a string field (``strings``: their field paths), a length past the end,
    an over-long varint, deeply nested groups."""
    n = len(b)
    i = rng.randrange(n + 1) if n else 0
    op = rng.choice(["flip", "flip", "set", "insert", "delete", "truncate", "dup", "field", "field",
                     "utf8", "utf8", "utf8", "overlength", "overlong_varint", "groups"])
    if op == "flip" and n:
        j = rng.randrange(n)
        bit = rng.randrange(8)
        return b[:j] + bytes([b[j] ^ (1 << bit)]) + b[j + 1:], f"flip bit {bit} of byte {j}"
    if op == "set" and n:
        j = rng.randrange(n)
        v = rng.choice([0x00, 0xFF, 0x80, 0x7F, rng.randrange(256)])
        return b[:j] + bytes([v]) + b[j + 1:], f"byte {j} = {v:#x}"
    if op == "insert":
        k = rng.randint(1, 8)
        return b[:i] + rng.randbytes(k) + b[i:], f"insert {k} bytes at {i}"
    if op == "delete" and n:
        k = rng.randint(1, min(8, n - min(i, n - 1)))
        j = min(i, n - 1)
        return b[:j] + b[j + k:], f"delete {k} bytes at {j}"
    if op == "truncate" and n:
        j = rng.randrange(n)
        return b[:j], f"truncate to {j} of {n} bytes"
    if op == "dup" and n:
        j = rng.randrange(n)
        k = rng.randint(1, n - j)
        return b[:j + k] + b[j:j + k] + b[j + k:], f"duplicate bytes {j}..{j + k}"
    if op == "utf8" and strings:
        path = rng.choice(list(strings))
        bad = rng.choice(BAD_UTF8)
        return b + nested(path, bad), f"invalid UTF-8 {bad!r} in string field {'.'.join(map(str, path))}"
    if op == "overlength":
        number = rng.choice([1, 2, 3, 4, 5, 6, 7])
        claimed = rng.choice([n + 1, 1 << 31, (1 << 64) - 1])
        return b + tag(number, LEN) + varint(claimed) + b"abc", f"field {number} claims {claimed} bytes past the end"
    if op == "overlong_varint":
        return b + tag(rng.choice([2, 3, 5]), VARINT) + b"\xff" * 10 + b"\x01", "an 11-byte varint"
    if op == "groups":
        depth = rng.choice([50, 101, 1000])
        return b + tag(99, SGROUP) * depth + tag(99, EGROUP) * depth, f"{depth} nested groups"
    field = _random_field(rng)
    return b[:i] + field + b[i:] if rng.random() < 0.5 else b + field, f"field {field[:6].hex()}.."


def mutate_list(rng: random.Random, msgs: list[bytes], extra: Callable[[], bytes]) -> tuple[list[bytes], str]:
    """One stream-level mutation: drop, duplicate, swap, reverse, move, cut, insert an
    empty, a random or an ``extra()`` message."""
    out = list(msgs)
    n = len(out)
    op = rng.choice(["drop", "dup", "swap", "reverse", "move_first_last", "cut", "empty", "garbage", "extra", "nothing"])
    if op == "drop" and n:
        j = rng.randrange(n)
        del out[j]
        return out, f"drop message {j}"
    if op == "dup" and n:
        j = rng.randrange(n)
        out.insert(rng.randrange(n + 1), out[j])
        return out, f"duplicate message {j}"
    if op == "swap" and n >= 2:
        j, k = rng.sample(range(n), 2)
        out[j], out[k] = out[k], out[j]
        return out, f"swap messages {j} and {k}"
    if op == "reverse" and n >= 2:
        return out[::-1], "reverse the messages"
    if op == "move_first_last" and n >= 2:
        return out[1:] + out[:1], "first message last"
    if op == "cut" and n:
        j = rng.randrange(n)
        return out[:j], f"only the first {j} messages"
    if op == "empty":
        out.insert(rng.randrange(n + 1), b"")
        return out, "insert an empty message"
    if op == "garbage":
        g = rng.randbytes(rng.randint(1, 64))
        out.insert(rng.randrange(n + 1), g)
        return out, f"insert {len(g)} random bytes as a message"
    if op == "nothing":
        return [], "no message at all"
    j = rng.randrange(n + 1)
    out.insert(j, extra())
    return out, f"insert an extra message at {j}"
