"""Security between aggregation ranks: the group secret, join proofs and sealed payloads.

torch.distributed's stock builds have no TLS: its store (``collective.open_store``) and
its gloo/NCCL connections are plain TCP. This module gives the aggregation group the
equivalent, with the ``cryptography`` library (HKDF, AES-GCM) and the standard
library's HMAC-SHA256:

- **The group secret**: 32 random bytes the launcher makes for each run and hands to
  every rank through the environment (:data:`GROUP_KEY_ENV`, hex) or a 0600 file
  (``--group-key-file`` / :data:`GROUP_KEY_FILE_ENV`); it never crosses the network.
  Every other key derives from it (:class:`GroupSecret`).
- **Join proofs** (every generation of the group, re-forms included): the leader
  posts a fresh challenge on the store (MACed, so a rank knows the leader holds the
  secret too); a joining rank answers ``HMAC(auth key, generation | rank | challenge |
  its nonce)``; the leader admits the ranks whose proof verifies and posts the MACed
  admission (members and their nonces). The process group of that generation then
  meets under a store prefix derived from the secret and the challenge, so a process
  without the secret neither passes the leader nor finds the group.
- **Sealed payloads** (:class:`Sealer`): each collective's payload is AES-GCM-sealed
  under a key of its generation (HKDF of the secret, salted with the challenge). The
  96-bit nonce is (sender rank, op sequence number, chunk), unique per key; the
  associated data binds the frame's header (generation, sender, op, kind) and the
  payload's size, so a tampered, truncated, replayed or reordered payload fails with a
  :class:`SealError` naming the sender and the op.

Frame layout: an 18-byte header (``b"BZ"``, version, kind, generation u32, sender u16,
op u64, little-endian) then the payload's chunks of at most :data:`CHUNK` bytes, each
followed by its 16-byte tag; :func:`sealed_size` gives its length from the payload's.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
import threading
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GROUP_KEY_ENV = "BYZFED_GROUP_KEY"
"""The group secret as 64 hex digits, in every rank's environment (never argv)."""
GROUP_KEY_FILE_ENV = "BYZFED_GROUP_KEY_FILE"
"""A file holding the group secret (64 hex digits), readable by its owner only."""
GROUP_KEY_BYTES = 32
CHUNK = 64 << 20
"""Bytes sealed under one nonce and tag (AES-GCM's buffers stay small; any size works)."""
TAG = 16
_HEADER = struct.Struct("<2sBcIHQ")
HEADER = _HEADER.size
_MAGIC, _VERSION = b"BZ", 1
_MAX_OP = (1 << 48) - 1
KINDS = {b"B": "broadcast", b"G": "all-gather", b"M": "MPI all-gather", b"K": "run key"}


class GroupKeyError(ValueError):
    """The group secret is missing or malformed (names where it was looked for)."""


class GroupAuthError(RuntimeError):
    """A rank could not prove the group secret, or the leader's messages do not verify."""


class SealError(RuntimeError):
    """A sealed payload does not open: tampered, replayed, reordered, or another key's.
    A ``RuntimeError``, as a failed collective is: the group handles it as one."""


# ----------------------------------------------------------------------------- the secret

def new_group_key() -> bytes:
    return secrets.token_bytes(GROUP_KEY_BYTES)


def parse_group_key(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != GROUP_KEY_BYTES:
        raise GroupKeyError(f"{where} must hold {2 * GROUP_KEY_BYTES} hex digits (a {GROUP_KEY_BYTES}-byte group "
                            f"key), got {len(text)} characters")
    return key


def write_group_key_file(path: Path, key: bytes) -> Path:
    """Write ``key`` (hex) to a new file readable by its owner only (0600)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key.hex() + "\n").encode())
    finally:
        os.close(fd)
    return path


def read_group_key_file(path: Path) -> bytes:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise GroupKeyError(f"group key file {path}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise GroupKeyError(f"group key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                            "chmod 600 it")
    return parse_group_key(text, f"group key file {path}")


def group_key_from(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Optional[bytes]:
    """The group secret from ``path`` (a key file), else :data:`GROUP_KEY_ENV`, else the
    file :data:`GROUP_KEY_FILE_ENV` names; None when none is given."""
    env = os.environ if env is None else env
    if path:
        return read_group_key_file(Path(path))
    if env.get(GROUP_KEY_ENV):
        return parse_group_key(env[GROUP_KEY_ENV], f"${GROUP_KEY_ENV}")
    if env.get(GROUP_KEY_FILE_ENV):
        return read_group_key_file(Path(env[GROUP_KEY_FILE_ENV]))
    return None


def _mac(key: bytes, *parts: object) -> bytes:
    msg = b"|".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return hmac.new(key, msg, hashlib.sha256).digest()


class GroupSecret:
    """The keys derived from one group secret (HKDF-SHA256, one label each)."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != GROUP_KEY_BYTES:
            raise GroupKeyError(f"a group key is {GROUP_KEY_BYTES} bytes")
        self._auth = self._derive(key, b"byzfed rank auth", None)
        self._key = key

    @staticmethod
    def _derive(key: bytes, label: bytes, salt: Optional[bytes]) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=label).derive(key)

    def __repr__(self) -> str:
        return "GroupSecret(<hidden>)"

    # join proofs ------------------------------------------------------------------
    def challenge_tag(self, generation: int, challenge: bytes) -> bytes:
        return _mac(self._auth, b"challenge", generation, challenge)

    def proof(self, generation: int, rid: int, challenge: bytes, nonce: bytes) -> bytes:
        return _mac(self._auth, b"join", generation, rid, challenge, nonce)

    def check_proof(self, generation: int, rid: int, challenge: bytes, nonce: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.proof(generation, rid, challenge, nonce), tag)

    def admission_tag(self, generation: int, challenge: bytes, body: bytes) -> bytes:
        return _mac(self._auth, b"admit", generation, challenge, body)

    def prefix(self, generation: int, challenge: bytes) -> str:
        """The store prefix of the generation's process group (unguessable without the secret)."""
        return _mac(self._auth, b"prefix", generation, challenge)[:12].hex()

    # sealing ----------------------------------------------------------------------
    def sealer(self, generation: int, challenge: bytes, rank: int) -> "Sealer":
        """This rank's :class:`Sealer` for generation ``generation`` (its rank there)."""
        key = self._derive(self._key, b"byzfed rank data|%d" % generation, challenge)
        return Sealer(key, generation, rank)


def sealed_size(nbytes: int) -> int:
    """The length of the frame that seals ``nbytes`` bytes."""
    chunks = max(1, -(-nbytes // CHUNK))
    return HEADER + nbytes + TAG * chunks


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The memory of a contiguous CPU tensor as a flat uint8 numpy array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class Sealer:
    """Seals and opens one generation's payloads; ``rank``: this rank in that generation.
    Every rank calls :meth:`next_op` once per sealed collective, in the same order (the
    collectives' own order), so the op numbers agree without being sent."""

    def __init__(self, key: bytes, generation: int, rank: int) -> None:
        self._aead = AESGCM(key)
        self.generation, self.rank = int(generation), int(rank)
        self._op = 0
        self._lock = threading.Lock()

    def next_op(self) -> int:
        with self._lock:
            self._op += 1
            if self._op > _MAX_OP:
                raise SealError("op counter exhausted for this generation")
            return self._op

    def _header(self, kind: bytes, sender: int, op: int) -> bytes:
        return _HEADER.pack(_MAGIC, _VERSION, kind, self.generation, sender, op)

    @staticmethod
    def _nonce(sender: int, op: int, chunk: int) -> bytes:
        return struct.pack("<H", sender) + op.to_bytes(6, "little") + struct.pack("<I", chunk)

    @staticmethod
    def _aad(header: bytes, nbytes: int, chunk: int, chunks: int) -> bytes:
        return header + struct.pack("<QII", nbytes, chunk, chunks)

    def seal(self, data: np.ndarray, op: int, kind: bytes, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The frame (uint8) sealing ``data`` (a flat uint8 array) as this rank's payload of
        op ``op``; written into ``out`` (of :func:`sealed_size` bytes) when given."""
        nbytes = int(data.size)
        size = sealed_size(nbytes)
        frame = np.empty(size, dtype=np.uint8) if out is None else out
        if frame.size != size:
            raise ValueError(f"out holds {frame.size} bytes, the frame {size}")
        header = self._header(kind, self.rank, op)
        frame[:HEADER] = np.frombuffer(header, dtype=np.uint8)
        chunks = max(1, -(-nbytes // CHUNK))
        pos = HEADER
        for c in range(chunks):
            part = data[c * CHUNK:(c + 1) * CHUNK]
            ct = self._aead.encrypt(self._nonce(self.rank, op, c), memoryview(part),
                                    self._aad(header, nbytes, c, chunks))
            frame[pos:pos + len(ct)] = np.frombuffer(ct, dtype=np.uint8)
            pos += len(ct)
        return frame

    def open(self, frame: np.ndarray, sender: int, op: int, kind: bytes, nbytes: int,
             out: Optional[np.ndarray] = None) -> np.ndarray:
        """The payload of ``frame``, which must be ``sender``'s op ``op`` of this generation
        (``kind``, ``nbytes`` long); into ``out`` (flat uint8 of ``nbytes``) when given.
        :class:`SealError` when it is not, or does not open."""
        what = f"{KINDS.get(kind, kind)} payload from rank {sender} (generation {self.generation}, op {op})"
        size = sealed_size(nbytes)
        if frame.size != size:
            raise SealError(f"{what}: {frame.size} bytes, expected {size}")
        expected = self._header(kind, sender, op)
        got = frame[:HEADER].tobytes()
        if got != expected:
            try:
                magic, _, k, g, s, o = _HEADER.unpack(got)
            except struct.error:  # (cannot happen: HEADER bytes)
                magic = b""
            if magic != _MAGIC:
                raise SealError(f"{what}: not a sealed frame (an unsealed sender, or garbage)")
            raise SealError(f"{what}: the frame says {KINDS.get(k, k)} of rank {s}, generation {g}, op {o}: "
                            "replayed, reordered or misdirected")
        result = np.empty(nbytes, dtype=np.uint8) if out is None else out
        chunks = max(1, -(-nbytes // CHUNK))
        pos = HEADER
        for c in range(chunks):
            n = min(CHUNK, nbytes - c * CHUNK) if nbytes else 0
            try:
                pt = self._aead.decrypt(self._nonce(sender, op, c), memoryview(frame[pos:pos + n + TAG]),
                                        self._aad(expected, nbytes, c, chunks))
            except InvalidTag:
                raise SealError(f"{what}: does not authenticate (tampered in transit, or sealed under another "
                                "group key)") from None
            result[c * CHUNK:c * CHUNK + n] = np.frombuffer(pt, dtype=np.uint8)
            pos += n + TAG
        return result
