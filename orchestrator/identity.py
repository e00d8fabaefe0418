"""Session identities any aggregation rank can check without asking the leader.

One secret key per run (``SessionKeys.key``, 32 random bytes; the leader shares it
with the other aggregation ranks when the group forms) derives everything a node
is handed that another rank must later verify:

- a node's id from its roster index and name (``n0003-<6 hex>``): the same on every
  rank, so a round's selection can be sent as roster indices;
- its session token, ``"<epoch>." + HMAC(key, "session" | node id | epoch)``, where
  ``epoch = floor(unix time / token_seconds)`` (``security.token_seconds``): a rank that
  never saw the node's join verifies it by recomputing it (no round trip to the leader),
  and every rank refuses it once it is too old (:meth:`SessionKeys.verify`);
- the upload nonce of its task in a round, ``HMAC(key, "nonce" | round | version |
  node id)``: the same on every rank, so an upload to any ingest rank is bound to its
  round and replays are refused everywhere.

Token lifetime: a token of epoch ``e`` is accepted while the verifying rank's epoch is
``e - 1``, ``e`` or ``e + 1``: at ``e + 1`` the node has until its next heartbeat to
pick up the rotated token (the leader hands it in the ``HeartbeatReply``); ``e - 1``
covers a rank whose clock lags the leader's (clock skew up to ``token_seconds``).
So a token lives between ``token_seconds`` and ``2 x token_seconds`` after it was
issued; an older one is refused as expired and the node re-joins with its node secret.
A token binds its node id, so one node's token never acts as another's.

HMAC-SHA256 from the standard library (``hmac``); tokens are compared in constant
time (``hmac.compare_digest``). Enrolled node names (``security.enrol``) are checked
against secrets of another key: ``orchestrator/enrolment.py``.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

KEY_BYTES = 32
TOKEN_SECONDS = 600.0
"""Default epoch of a session token (``security.token_seconds``)."""
TOKEN_SLACK_EPOCHS = 1
"""Epochs a token is accepted before (clock skew) and after (rotation) its own."""
_NODE_ID = re.compile(r"^n(\d{4,6})-[0-9a-f]{6}$")
_TOKEN = re.compile(r"^(\d{1,15})\.([0-9a-f]{32})$")


class TokenRefused(Exception):
    """A session token that does not verify; ``expired``: it did, but its epoch is over."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class SessionKeys:
    key: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES), repr=False)
    token_seconds: float = TOKEN_SECONDS
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)
    """Wall-clock time (seconds since the epoch): ranks on other machines share it, roughly."""

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a session key is {KEY_BYTES} bytes, got {len(self.key)}")
        if not (isinstance(self.token_seconds, (int, float)) and math.isfinite(self.token_seconds)
                and self.token_seconds > 0):
            raise ValueError(f"token_seconds must be a positive number, got {self.token_seconds!r}")

    def lasting(self, token_seconds: float) -> "SessionKeys":
        """The same key with session tokens of ``token_seconds`` epochs."""
        return self if token_seconds == self.token_seconds else replace(self, token_seconds=token_seconds)

    def _mac(self, *parts: object) -> str:
        msg = "|".join(str(p) for p in parts).encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def node_id(self, index: int, name: str) -> str:
        """The id of roster entry ``index`` (named ``name``): deterministic per run."""
        return f"n{index:04d}-{self._mac('id', index, name)[:6]}"

    def epoch(self) -> int:
        return int(self.clock() // self.token_seconds)

    def token(self, node_id: str, epoch: Optional[int] = None) -> str:
        """``node_id``'s session token of ``epoch`` (default: the current one)."""
        e = self.epoch() if epoch is None else epoch
        return f"{e}.{self._mac('session', node_id, e)[:32]}"

    def nonce(self, round_id: int, model_version: int, node_id: str) -> str:
        return self._mac("nonce", round_id, model_version, node_id)[:32]

    def verify(self, node_id: str, token: str) -> int:
        """The epoch of ``node_id``'s valid ``token``; :class:`TokenRefused` when it is not
        that node's (malformed, forged, another node's) or is expired (see the module doc)."""
        m = _TOKEN.match(token)
        if not (_NODE_ID.match(node_id) and m
                and hmac.compare_digest(self.token(node_id, int(m.group(1))).encode(), token.encode())):
            raise TokenRefused("session token does not belong to this node id")
        issued, now = int(m.group(1)), self.epoch()
        if issued < now - TOKEN_SLACK_EPOCHS:
            raise TokenRefused(f"session token expired: issued in epoch {issued}, now epoch {now} (epochs of "
                               f"security.token_seconds = {self.token_seconds:g} s; a token is accepted "
                               f"{TOKEN_SLACK_EPOCHS} epoch past its own); re-join with the node secret for a "
                               "new one", expired=True)
        if issued > now + TOKEN_SLACK_EPOCHS:
            raise TokenRefused(f"session token is of epoch {issued}, ahead of this rank's epoch {now} by more than "
                               f"{TOKEN_SLACK_EPOCHS} (clock skew over security.token_seconds = "
                               f"{self.token_seconds:g} s?)")
        return issued

    def check_token(self, node_id: str, token: str) -> bool:
        try:
            self.verify(node_id, token)
        except TokenRefused:
            return False
        return True


def index_of(node_id: str) -> int:
    """The roster index inside a node id made by :meth:`SessionKeys.node_id` (-1 if none)."""
    m = _NODE_ID.match(node_id)
    return int(m.group(1)) if m else -1
