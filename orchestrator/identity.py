"""Session identities any aggregation rank can check without asking the leader.

One secret key per run (``SessionKeys.key``, 32 random bytes; the leader shares it
with the other aggregation ranks when the group forms) derives everything a node
is handed that another rank must later verify:

- a node's id from its roster index and name (``n0003-<6 hex>``): the same on every
  rank, so a round's selection can be sent as roster indices;
- its session token, ``HMAC(key, "session" | node id)``: a rank that never saw the
  node's join verifies it by recomputing it (no round trip to the leader);
- the upload nonce of its task in a round, ``HMAC(key, "nonce" | round | version |
  node id)``: the same on every rank, so an upload to any ingest rank is bound to its
  round and replays are refused everywhere.

HMAC-SHA256 from the standard library (``hmac``); tokens are compared in constant
time by the callers (``hmac.compare_digest``). Token expiry and rotation, and
enrolled per-node credentials, belong to the security issue: a token lives as long
as the run's key.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

KEY_BYTES = 32
_NODE_ID = re.compile(r"^n(\d{4,6})-[0-9a-f]{6}$")


@dataclass(frozen=True)
class SessionKeys:
    key: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES), repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a session key is {KEY_BYTES} bytes, got {len(self.key)}")

    def _mac(self, *parts: object) -> str:
        msg = "|".join(str(p) for p in parts).encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def node_id(self, index: int, name: str) -> str:
        """The id of roster entry ``index`` (named ``name``): deterministic per run."""
        return f"n{index:04d}-{self._mac('id', index, name)[:6]}"

    def token(self, node_id: str) -> str:
        return self._mac("session", node_id)[:32]

    def nonce(self, round_id: int, model_version: int, node_id: str) -> str:
        return self._mac("nonce", round_id, model_version, node_id)[:32]

    def check_token(self, node_id: str, token: str) -> bool:
        return bool(_NODE_ID.match(node_id)) and hmac.compare_digest(self.token(node_id).encode(), token.encode())


def index_of(node_id: str) -> int:
    """The roster index inside a node id made by :meth:`SessionKeys.node_id` (-1 if none)."""
    m = _NODE_ID.match(node_id)
    return int(m.group(1)) if m else -1
