"""Refusals: why the orchestrator said no, independent of gRPC.

The servicer maps each ``reason`` to a ``grpc.StatusCode``; the state machines
raise :class:`Refusal` and know nothing of the transport.
"""
from __future__ import annotations

REASONS = {
    "unauthenticated",   # bad federation token, session token or node secret
    "permission_denied", # authenticated but not allowed (not selected this round)
    "invalid",           # malformed: layout, dtype, byte count, non-finite values
    "stale",             # round or model version is not the open one
    "duplicate",         # a second update from the same node in the same round
    "checksum",          # the bytes do not match their CRC
    "too_large",         # more bytes than declared / allowed
    "not_found",         # unknown node
    "unavailable",       # the orchestrator is shutting down
    "broken_stream",     # the client cut its upload stream (died or cancelled)
    "wrong_endpoint",    # sent to an aggregation rank that does not serve it (another rank or the leader does)
}


class Refusal(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
