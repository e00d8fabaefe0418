"""Churn a node inflicts on itself, as its scenario role says (``--churn JSON``).

Cross-device nodes are unreliable; these keys make a real node process behave
like one (``orchestrator.checks`` checks them; the launcher, ``orchestrator.launch``,
passes them on):

* ``crash_phase`` (``"download"``, ``"train"`` or ``"upload"``) with
  ``crash_probability`` (drawn per round from ``(seed, round, node)``) and/or
  ``crash_at_round``: the process sends itself SIGKILL at that point of a round
  it was selected for. ``download``: after the task header arrived, before the
  weights; ``train``: after local training, before any upload; ``upload``: in the
  middle of the update stream, after the header and about half of the chunks
  went out, so the orchestrator sees a broken stream. Nothing is cleaned up:
  no Leave, the lease simply runs out, the training slot's lock dies with the
  process. (``restart_after_seconds``, a launcher key, brings the node back.)
* ``latency_ms``: added before every RPC the node makes (a gRPC client
  interceptor), i.e. a slow link.
* ``slowdown`` (>= 1) and ``train_delay_s``: a straggler. After training, the
  node waits ``(slowdown - 1) x`` its training time plus ``train_delay_s`` before
  uploading; it waits outside its training slot, since a slow device is slow on
  its own hardware, not on the machine's shared cores.

Torch-free: an idle node imports this module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import grpc

log = logging.getLogger("fednode.churn")

CRASH_PHASES = ("download", "train", "upload")


class ChurnError(ValueError):
    """The churn spec is invalid; the node refuses to start."""


def uniform(*parts: Any) -> float:
    """A number in [0, 1) from any tuple of ints and strings, stable across processes."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


@dataclass(frozen=True, kw_only=True)
class ChurnSpec:
    crash_phase: str = ""
    crash_probability: float = 0.0
    crash_at_round: int = -1
    latency_ms: float = 0.0
    slowdown: float = 1.0
    train_delay_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crash_phase not in ("",) + CRASH_PHASES:
            raise ChurnError(f"crash_phase={self.crash_phase!r}: must be one of {', '.join(map(repr, CRASH_PHASES))}")
        if not 0.0 <= self.crash_probability <= 1.0:
            raise ChurnError(f"crash_probability={self.crash_probability!r}: must be in [0, 1]")
        if (self.crash_probability > 0 or self.crash_at_round >= 0) and not self.crash_phase:
            raise ChurnError("crash_probability / crash_at_round need crash_phase")
        if self.latency_ms < 0 or self.train_delay_s < 0 or self.slowdown < 1.0:
            raise ChurnError("latency_ms and train_delay_s must be >= 0, slowdown >= 1")

    @classmethod
    def from_json(cls, text: str) -> "ChurnSpec":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ChurnError(f"churn is not JSON: {exc}") from None
        allowed = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or set(raw) - set(allowed):
            raise ChurnError(f"churn must be an object with keys among {', '.join(allowed)}; got {raw!r}")
        return cls(**raw)


class Churn:
    """The node's self-inflicted churn for each round (see the module docstring)."""

    def __init__(self, spec: ChurnSpec, node_name: str) -> None:
        self.spec = spec
        self.name = node_name

    # ----- crashes ------------------------------------------------------------------
    def crashes_in(self, round_id: int, phase: str) -> bool:
        s = self.spec
        if s.crash_phase != phase:
            return False
        if s.crash_at_round >= 0 and round_id == s.crash_at_round:
            return True
        return s.crash_probability > 0 and uniform(s.seed, "crash", round_id, self.name) < s.crash_probability

    def crash_point(self, phase: str, round_id: int) -> None:
        """SIGKILL this process now if the spec says so for ``(phase, round_id)``."""
        if self.crashes_in(round_id, phase):
            die(f"{self.name}: round {round_id}: crash injected while {phase_verb(phase)} (SIGKILL)")

    def upload_plan(self, round_id: int, num_bytes: int, chunk_bytes: int) -> Optional[tuple[int, int]]:
        """For a mid-upload crash: ``(chunk_bytes, chunks to send before dying)``, else None.
        Small chunks make a multi-chunk stream even for a small model."""
        if not self.crashes_in(round_id, "upload"):
            return None
        chunk = max(4, min(chunk_bytes, (num_bytes // 4) // 4 * 4))
        total = -(-num_bytes // chunk)
        return chunk, max(1, total // 2)

    # ----- slow nodes ------------------------------------------------------------------
    def interceptors(self) -> list:
        return [LatencyInterceptor(self.spec.latency_ms / 1000.0)] if self.spec.latency_ms > 0 else []

    def straggle(self, train_seconds: float, stop: threading.Event) -> float:
        """Wait as a slow device would after training ``train_seconds``; returns the wait."""
        wait = (self.spec.slowdown - 1.0) * train_seconds + self.spec.train_delay_s
        if wait > 0:
            log.info("%s: straggling %.2fs before the upload", self.name, wait)
            stop.wait(wait)
        return wait


def phase_verb(phase: str) -> str:
    return {"download": "downloading the task", "train": "training", "upload": "uploading"}.get(phase, phase)


def die(message: str) -> None:
    """Log, flush, and SIGKILL this very process (no clean-up of any kind)."""
    log.warning(message)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - dying anyway
            pass
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached: SIGKILL cannot be caught


class LatencyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Sleeps ``seconds`` before every call: a slow link's added latency."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _call(self, continuation, details, request):
        time.sleep(self.seconds)
        return continuation(details, request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call
