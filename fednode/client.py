"""The node's gRPC client: the only fednode module that touches message types.

Torch-free until a task's weights are read: an idle node only joins, heartbeats
and polls (``Task.weights`` becomes a tensor on first access).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import grpc

from proto import codec, tls
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc
from proto.layout import Layout

if TYPE_CHECKING:
    import torch

    from .churn import Churn

PROTOCOL_VERSION = 2
"""2: an upload echoes its task's ``upload_nonce`` (see :meth:`FederationClient.update_header`)."""
NONCES_KEPT = 16
"""Upload nonces of the most recent train tasks this client keeps (one per round)."""


@dataclass
class Session:
    node_id: str
    token: str
    lease_seconds: float
    layout: Layout
    layout_hash: str
    workload: dict
    ingest_address: str
    rejoined: bool
    current_round: int


class _TensorOnRead:
    """Field descriptor: holds a tensor or a numpy float32 array, returns a tensor
    (importing torch on the first read, i.e. when the node starts its round)."""

    def __set_name__(self, owner, name: str) -> None:
        self._attr = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return None  # the dataclass default
        value = getattr(obj, self._attr)
        if value is not None and not hasattr(value, "detach"):
            import torch

            value = torch.from_numpy(value)
            setattr(obj, self._attr, value)
        return value

    def __set__(self, obj, value) -> None:
        setattr(obj, self._attr, value)


@dataclass
class Task:
    kind: str  # "wait" | "train" | "shutdown"
    round: int = -1
    model_version: int = -1
    deadline_unix: float = 0.0
    train: Optional[dict] = None
    weights: Optional[torch.Tensor] = _TensorOnRead()  # type: ignore[assignment]
    upload_nonce: str = ""
    """The nonce the upload answering this task must echo (:meth:`FederationClient.update_header` does)."""
    header_at: float = 0.0
    """``time.monotonic()`` when the task's header arrived (the round reached this node)."""
    download_seconds: float = 0.0
    """From the header to the last weight chunk decoded."""
    train_cpu: Optional[float] = None
    """CPU seconds the node's local training for this task took (set by the node)."""


_WILDCARDS = ("0.0.0.0", "::", "[::]", "*", "")


def _split_host(address: str) -> tuple[str, str]:
    """``host:port`` -> (host, port); an IPv6 host keeps its brackets."""
    host, sep, port = address.rpartition(":")
    return (host, port) if sep else (address, "")


def resolve_address(advertised: str, joined_on: str) -> str:
    """The address to dial for a service the orchestrator advertised, given the orchestrator
    address this node joined on (``--orchestrator``):

    * ``""``: the orchestrator address itself (it listens on a wildcard address and has no
      ``advertise_host``; the node keeps the address it reached it at);
    * ``":PORT"`` or a wildcard host (``0.0.0.0:PORT``, ``[::]:PORT``; an older orchestrator
      advertised its bind address): the orchestrator's host with that port;
    * anything else as is.
    """
    if not advertised:
        return joined_on
    host, port = _split_host(advertised)
    if host in _WILDCARDS and port:
        return f"{_split_host(joined_on)[0]}:{port}"
    return advertised


def is_relative(advertised: str) -> bool:
    """Whether :func:`resolve_address` needs the orchestrator address to resolve ``advertised``."""
    host, port = _split_host(advertised)
    return not advertised or (host in _WILDCARDS and bool(port))


def quiet_waits(seconds: float = 2.0) -> None:
    """Wake a waiting node seldom: grpc's synchronous client waits for a response in
    slices of ``grpc._common.MAXIMUM_WAIT_TIMEOUT`` (0.1 s), so that Python can run
    signal handlers. On POSIX a lock wait is interrupted by a signal anyway (Python
    >= 3.2), so the slices only wake an idle node's main thread ten times a second
    in its 20 s long-poll: about half of an idle node's CPU (BENCHMARKS.md, "Idle
    node CPU"). Deadlines are kept either way (a slice never outlasts the call's
    remaining time). Only node processes call this."""
    import grpc._common as common

    seconds = float(os.environ.get("BYZFED_NODE_WAIT_SLICE", seconds))  # (0.1: grpc's own, for A/B benches)
    if isinstance(getattr(common, "MAXIMUM_WAIT_TIMEOUT", None), float) and seconds > 0:
        common.MAXIMUM_WAIT_TIMEOUT = seconds


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES)]


class FederationClient:
    def __init__(self, address: str, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES, churn: Optional[Churn] = None,
                 tls_files: Optional[tls.ClientTls] = None) -> None:
        self.address = address
        self.tls = tls_files or tls.default()
        """TLS of every channel this client opens (``[security]``; default: the process's, None: plaintext)."""
        self.chunk_bytes = chunk_bytes
        self.churn = churn  # self-inflicted crashes and latency (scenario churn keys), None for none
        self.channel = self._channel(address)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.session: Optional[Session] = None
        self._upload_stub = self.stub
        self._upload_channel: Optional[grpc.Channel] = None
        self.upload_address = address
        """Where updates go: the orchestrator's advertised ingest address, resolved (``resolve_address``)."""
        self._nonces: dict[tuple[int, int], str] = {}
        """(round, model version) -> the upload nonce of the train task received for it (the latest few)."""

    def _channel(self, address: str) -> grpc.Channel:
        channel = tls.channel(address, channel_options(), self.tls)
        interceptors = self.churn.interceptors() if self.churn is not None else []
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    def close(self) -> None:
        self._close_upload_channel()
        self.channel.close()

    def _close_upload_channel(self) -> None:
        if self._upload_channel is not None:
            self._upload_channel.close()
            self._upload_channel = None

    def _session_pb(self) -> pb.Session:
        assert self.session is not None, "join first"
        return pb.Session(node_id=self.session.node_id, session_token=self.session.token)

    def join(self, name: str, secret: str, federation_token: str, num_samples: int = 0,
             timeout: float = 10.0) -> Session:
        reply = self.stub.Join(pb.JoinRequest(
            credentials=pb.Credentials(node_name=name, node_secret=secret, federation_token=federation_token),
            num_samples=num_samples, device="cpu", cpu_cores=len(os.sched_getaffinity(0)),
            protocol_version=PROTOCOL_VERSION), timeout=timeout)
        self.session = Session(reply.node_id, reply.session_token, reply.lease_seconds,
                               Layout.from_json(reply.layout_json), reply.layout_hash, json.loads(reply.workload_json),
                               reply.ingest_address, reply.rejoined, reply.current_round)
        # '' (the orchestrator listens on a wildcard address, no advertise_host): keep the
        # channel this node joined on; never dial a wildcard address (that is this machine)
        ingest = resolve_address(reply.ingest_address, self.address)
        if ingest == self.address:
            self._upload_stub = self.stub
        elif ingest != self.upload_address:  # (a re-join to the same ingest keeps its channel)
            self._close_upload_channel()
            self._upload_channel = self._channel(ingest)
            self._upload_stub = pb_grpc.FederationStub(self._upload_channel)
        self.upload_address = ingest
        return self.session

    def heartbeat(self, timeout: float = 5.0, received_round: Optional[int] = None) -> pb.HeartbeatReply:
        """Renew the lease; ``received_round`` also tells the orchestrator that this
        node holds that round's whole task (it is now training, not downloading). A reply
        with a ``session_token`` rotates this session's token (``security.token_seconds``)."""
        session = self.session
        req = pb.HeartbeatRequest(session=self._session_pb())
        if received_round is not None:
            req.received_round = received_round
        reply = self.stub.Heartbeat(req, timeout=timeout)
        if reply.session_token and self.session is session:  # the token's epoch turned: use the fresh one
            session.token = reply.session_token  # (not after a re-join meanwhile: that brought its own)
        return reply

    def leave(self, reason: str = "", timeout: float = 5.0) -> None:
        self.stub.Leave(pb.LeaveRequest(session=self._session_pb(), reason=reason), timeout=timeout)

    def get_task(self, wait_seconds: float = 10.0, timeout: float = 600.0) -> Task:
        # tasks come from the node's ingest endpoint (its aggregation rank), like uploads go to it
        stream = self._upload_stub.GetTask(pb.GetTaskRequest(session=self._session_pb(), wait_seconds=wait_seconds),
                                   timeout=wait_seconds + timeout)
        first = next(stream)
        header_at = time.monotonic()
        h = first.header
        if h.kind == pb.TaskHeader.SHUTDOWN:
            return Task("shutdown")
        if h.kind == pb.TaskHeader.WAIT:
            return Task("wait", round=h.round)
        if self.churn is not None:
            self.churn.crash_point("download", h.round)
        weights = codec.decode_array(h.weights, (m.data for m in stream), expected_bytes=self.session.layout.d * 4)
        self.remember_nonce(h.round, h.model_version, h.upload_nonce)
        return Task("train", h.round, h.model_version, h.deadline_unix, json.loads(h.train_json), weights,
                    h.upload_nonce, header_at, time.monotonic() - header_at)

    def remember_nonce(self, round_id: int, model_version: int, nonce: str) -> None:
        """Keep the upload nonce of a train task (``get_task`` does) for :meth:`update_header`."""
        self._nonces.pop((round_id, model_version), None)
        self._nonces[(round_id, model_version)] = nonce
        while len(self._nonces) > NONCES_KEPT:
            del self._nonces[next(iter(self._nonces))]

    def nonce_for(self, round_id: int, model_version: int) -> str:
        """The nonce of the last train task received for (round, version); else for the round; else ''."""
        nonce = self._nonces.get((round_id, model_version))
        if nonce is None:
            nonce = next((v for (r, _), v in reversed(list(self._nonces.items())) if r == round_id), "")
        return nonce

    def update_header(self, round_id: int, model_version: int, delta_bytes: memoryview, num_samples: int,
                      **overrides) -> pb.UpdateHeader:
        """The header of an upload for (``round_id``, ``model_version``): it echoes the upload
        nonce of the task this client received for them (``upload_nonce=`` overrides it)."""
        assert self.session is not None
        h = pb.UpdateHeader(session=self._session_pb(), round=round_id, model_version=model_version,
                            layout_hash=self.session.layout_hash, num_samples=num_samples,
                            tensor=codec.tensor_header(delta_bytes, (len(delta_bytes) // 4,)),
                            upload_nonce=self.nonce_for(round_id, model_version))
        for key, value in overrides.items():  # used by tests and the malformed-upload attack
            if key in ("dtype", "num_bytes", "crc32"):
                setattr(h.tensor, key, value)
            elif key in ("node_id", "session_token"):
                setattr(h.session, key, value)
            else:
                setattr(h, key, value)
        return h

    def _learn_nonce(self, round_id: int, model_version: int) -> None:
        """An upload for a round whose task this client did not fetch (e.g. a benchmark that
        only uploads): the heartbeat reply carries the nonce of the node's open sync task."""
        try:
            reply = self.heartbeat()
        except grpc.RpcError:
            return  # the upload itself reports what is wrong
        if reply.upload_nonce:  # (the nonce of the one round open to this node: another round is refused anyway)
            self.remember_nonce(round_id, model_version, reply.upload_nonce)

    def push_raw(self, header: pb.UpdateHeader, chunks: Iterable[bytes], timeout: float = 600.0) -> pb.PushUpdateReply:
        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for c in chunks:
                yield pb.UpdateChunk(data=c)
        return self._upload_stub.PushUpdate(messages(), timeout=timeout)

    def push_update(self, round_id: int, model_version: int, delta: torch.Tensor, num_samples: int,
                    timeout: float = 600.0, **overrides) -> pb.PushUpdateReply:
        buf = codec.tensor_bytes(delta)
        if "upload_nonce" not in overrides and not self.nonce_for(round_id, model_version):
            self._learn_nonce(round_id, model_version)
        header = self.update_header(round_id, model_version, buf, num_samples, **overrides)
        plan = self.churn.upload_plan(round_id, len(buf), self.chunk_bytes) if self.churn is not None else None
        if plan is not None:  # crash mid-upload: part of the stream goes out, then the process dies
            return self.push_raw(header, _dying_chunks(buf, *plan, f"round {round_id}"), timeout=timeout)
        return self.push_raw(header, codec.iter_chunks(buf, self.chunk_bytes), timeout=timeout)


def _dying_chunks(buf: memoryview, chunk_bytes: int, send: int, what: str) -> Iterator[bytes]:
    """The first ``send`` chunks of ``buf``, then SIGKILL of this process (gRPC's sender
    thread pulls from this generator, so the stream is really open and half sent)."""
    from .churn import die

    for i, chunk in enumerate(codec.iter_chunks(buf, chunk_bytes)):
        if i == send:
            time.sleep(0.3)  # let the chunks already handed to gRPC reach the wire
            die(f"{what}: crash injected while uploading, after {send} chunks of {chunk_bytes} bytes (SIGKILL)")
        yield chunk

