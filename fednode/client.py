"""The node's gRPC client: the only fednode module that touches message types."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import grpc
import torch

from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc
from proto.layout import Layout

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


@dataclass
class Task:
    kind: str  # "wait" | "train" | "shutdown"
    round: int = -1
    model_version: int = -1
    deadline_unix: float = 0.0
    train: Optional[dict] = None
    weights: Optional[torch.Tensor] = None


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES)]


class FederationClient:
    def __init__(self, address: str, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.channel = grpc.insecure_channel(address, options=channel_options())
        self.stub = pb_grpc.FederationStub(self.channel)
        self.session: Optional[Session] = None
        self._upload_stub = self.stub

    def close(self) -> None:
        self.channel.close()

    def _session_pb(self) -> pb.Session:
        assert self.session is not None, "join first"
        return pb.Session(node_id=self.session.node_id, session_token=self.session.token)

    def join(self, name: str, secret: str, federation_token: str, num_samples: int = 0,
             timeout: float = 10.0) -> Session:
        reply = self.stub.Join(pb.JoinRequest(
            credentials=pb.Credentials(node_name=name, node_secret=secret, federation_token=federation_token),
            num_samples=num_samples, device="cpu", cpu_cores=torch.get_num_threads(),
            protocol_version=PROTOCOL_VERSION), timeout=timeout)
        self.session = Session(reply.node_id, reply.session_token, reply.lease_seconds,
                               Layout.from_json(reply.layout_json), reply.layout_hash, json.loads(reply.workload_json),
                               reply.ingest_address, reply.rejoined, reply.current_round)
        if reply.ingest_address and reply.ingest_address != self.address:
            self._upload_channel = grpc.insecure_channel(reply.ingest_address, options=channel_options())
            self._upload_stub = pb_grpc.FederationStub(self._upload_channel)
        return self.session

    def heartbeat(self, timeout: float = 5.0) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(pb.HeartbeatRequest(session=self._session_pb()), timeout=timeout)

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
        weights = codec.decode_stream(h.weights, (m.data for m in stream), expected_bytes=self.session.layout.d * 4)
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
        return self.push_raw(header, codec.iter_chunks(buf, self.chunk_bytes), timeout=timeout)

