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

from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc
from proto.layout import Layout

if TYPE_CHECKING:
    import torch

    from .churn import Churn

PROTOCOL_VERSION = 1


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


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES)]


class FederationClient:
    def __init__(self, address: str, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES, churn: Optional[Churn] = None) -> None:
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.churn = churn  # self-inflicted crashes and latency (scenario churn keys), None for none
        self.channel = self._channel(address)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.session: Optional[Session] = None
        self._upload_stub = self.stub

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address, options=channel_options())
        interceptors = self.churn.interceptors() if self.churn is not None else []
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    def close(self) -> None:
        self.channel.close()

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
        if reply.ingest_address and reply.ingest_address != self.address:
            self._upload_channel = self._channel(reply.ingest_address)
            self._upload_stub = pb_grpc.FederationStub(self._upload_channel)
        return self.session

    def heartbeat(self, timeout: float = 5.0, received_round: Optional[int] = None) -> pb.HeartbeatReply:
        """Renew the lease; ``received_round`` also tells the orchestrator that this
        node holds that round's whole task (it is now training, not downloading)."""
        req = pb.HeartbeatRequest(session=self._session_pb())
        if received_round is not None:
            req.received_round = received_round
        return self.stub.Heartbeat(req, timeout=timeout)

    def leave(self, reason: str = "", timeout: float = 5.0) -> None:
        self.stub.Leave(pb.LeaveRequest(session=self._session_pb(), reason=reason), timeout=timeout)

    def get_task(self, wait_seconds: float = 10.0, timeout: float = 600.0) -> Task:
        stream = self.stub.GetTask(pb.GetTaskRequest(session=self._session_pb(), wait_seconds=wait_seconds),
                                   timeout=wait_seconds + timeout)
        first = next(stream)
        h = first.header
        if h.kind == pb.TaskHeader.SHUTDOWN:
            return Task("shutdown")
        if h.kind == pb.TaskHeader.WAIT:
            return Task("wait", round=h.round)
        if self.churn is not None:
            self.churn.crash_point("download", h.round)
        weights = codec.decode_array(h.weights, (m.data for m in stream), expected_bytes=self.session.layout.d * 4)
        return Task("train", h.round, h.model_version, h.deadline_unix, json.loads(h.train_json), weights)

    def update_header(self, round_id: int, model_version: int, delta_bytes: memoryview, num_samples: int,
                      **overrides) -> pb.UpdateHeader:
        assert self.session is not None
        h = pb.UpdateHeader(session=self._session_pb(), round=round_id, model_version=model_version,
                            layout_hash=self.session.layout_hash, num_samples=num_samples,
                            tensor=codec.tensor_header(delta_bytes, (len(delta_bytes) // 4,)))
        for key, value in overrides.items():  # used by tests and the malformed-upload attack
            if key in ("dtype", "num_bytes", "crc32"):
                setattr(h.tensor, key, value)
            elif key in ("node_id", "session_token"):
                setattr(h.session, key, value)
            else:
                setattr(h, key, value)
        return h

    def push_raw(self, header: pb.UpdateHeader, chunks: Iterable[bytes], timeout: float = 600.0) -> pb.PushUpdateReply:
        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for c in chunks:
                yield pb.UpdateChunk(data=c)
        return self._upload_stub.PushUpdate(messages(), timeout=timeout)

    def push_update(self, round_id: int, model_version: int, delta: torch.Tensor, num_samples: int,
                    timeout: float = 600.0, **overrides) -> pb.PushUpdateReply:
        buf = codec.tensor_bytes(delta)
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

