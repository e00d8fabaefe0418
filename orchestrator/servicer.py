"""gRPC edge of the orchestrator: adapts messages, maps refusals to status codes.

Thin by design: every decision is made by the coordinator, membership and round
keeper; this module only decodes, delegates and answers.
"""
from __future__ import annotations

import time
from concurrent import futures
from typing import Iterator

import grpc

from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb
from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc

from .coordinator import Coordinator
from .errors import Refusal
from .rounds import Upload

STATUS = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "stale": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "checksum": grpc.StatusCode.DATA_LOSS,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
CODEC_REASON = {"dtype": "invalid", "size": "invalid", "truncated": "invalid", "oversized": "too_large",
                "checksum": "checksum"}
PROTOCOL_VERSION = 1
MAX_WAIT_SECONDS = 20.0


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, coord: Coordinator, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.coord = coord
        self.chunk_bytes = chunk_bytes

    def _abort(self, context: grpc.ServicerContext, refusal: Refusal):
        context.abort(STATUS[refusal.reason], refusal.message)

    def Join(self, request: pb.JoinRequest, context):
        c = self.coord
        cred = request.credentials
        try:
            if request.protocol_version not in (0, PROTOCOL_VERSION):
                raise Refusal("invalid", f"protocol version {request.protocol_version} unsupported; "
                                         f"this orchestrator speaks {PROTOCOL_VERSION}")
            workload = c.workload_for(cred.node_name)
            member, rejoined = c.membership.join(cred.node_name, cred.node_secret, cred.federation_token,
                                                 request.num_samples, c.round_id,
                                                 {"device": request.device, "cores": request.cpu_cores})
        except Refusal as r:
            self._abort(context, r)
        c.on_event("rejoined" if rejoined else "joined", {"node": member.name})
        return pb.JoinReply(node_id=member.node_id, session_token=member.token,
                            lease_seconds=c.membership.lease_seconds, layout_json=c.layout_json,
                            layout_hash=c.layout_hash, ingest_address=c.ingest_address, workload_json=workload,
                            rejoined=rejoined, current_round=c.round_id)

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        try:
            m = self.coord.membership.heartbeat(request.session.node_id, request.session.session_token)
        except Refusal as r:
            self._abort(context, r)
        if request.HasField("received_round"):
            self.coord.keeper.mark_downloaded(m.node_id, request.received_round)
        return pb.HeartbeatReply(lease_seconds=self.coord.membership.lease_seconds, current_round=self.coord.round_id,
                                 selected=self.coord.keeper.task_for(m.node_id) is not None,
                                 shutdown=self.coord.shutdown.is_set())

    def Leave(self, request: pb.LeaveRequest, context):
        try:
            self.coord.membership.leave(request.session.node_id, request.session.session_token)
        except Refusal as r:
            self._abort(context, r)
        self.coord.keeper.notify()
        return pb.LeaveReply()

    def GetTask(self, request: pb.GetTaskRequest, context) -> Iterator[pb.TaskChunk]:
        c = self.coord
        try:
            m = c.membership.authenticate(request.session.node_id, request.session.session_token)
        except Refusal as r:
            self._abort(context, r)
        wait = min(max(request.wait_seconds, 0.0), MAX_WAIT_SECONDS)
        deadline = time.monotonic() + wait
        rnd = None
        while not c.shutdown.is_set() and context.is_active():
            rnd = c.keeper.wait_task(m.node_id, min(0.5, max(0.0, deadline - time.monotonic())))
            if rnd is not None or time.monotonic() >= deadline:
                break
        if c.shutdown.is_set():
            yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.SHUTDOWN))
            return
        if rnd is None:
            yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.WAIT, round=c.round_id))
            return
        # async tickets carry the weights of their version (the model may move on meanwhile)
        buf = memoryview(getattr(rnd, "payload", b"") or c.weights_payload(rnd.model_version))
        header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, round=rnd.round_id, model_version=rnd.model_version,
                               deadline_unix=time.time() + (rnd.deadline - time.monotonic()),
                               train_json=c.train_json(rnd), layout_hash=c.layout_hash,
                               weights=codec.tensor_header(buf, (c.layout.d,)))
        yield pb.TaskChunk(header=header)
        for chunk in codec.iter_chunks(buf, self.chunk_bytes):
            yield pb.TaskChunk(data=chunk)

    def PushUpdate(self, request_iterator, context):
        c = self.coord
        started = time.monotonic()
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise Refusal("invalid", "an upload must start with an UpdateHeader")
            h = first.header
            member = c.membership.authenticate(h.session.node_id, h.session.session_token)
            if h.layout_hash != c.layout_hash:
                raise Refusal("invalid", f"layout hash {h.layout_hash!r} does not match the model's {c.layout_hash!r}")
            if h.num_samples <= 0:
                raise Refusal("invalid", f"num_samples must be positive, got {h.num_samples}")
            rnd = c.keeper.begin_upload(member.node_id, h.round, h.model_version)
        except Refusal as r:
            c.keeper.count_refusal(r.reason)
            self._abort(context, r)
        reason = "invalid"
        try:
            asm = codec.Assembler(h.tensor, expected_bytes=c.layout.d * 4)
            for msg in request_iterator:
                if msg.WhichOneof("payload") != "data":
                    raise Refusal("invalid", "a second header inside one upload")
                asm.add(msg.data)
            delta = asm.finish()
            bad = codec.count_nonfinite(delta)
            if bad:
                raise Refusal("invalid", f"update has {bad} non-finite values (NaN or Inf)")
            upload = Upload(member.node_id, delta, int(h.num_samples), asm.received, time.monotonic() - started)
        except codec.CodecError as e:
            if e.reason == "truncated" and _client_gone(context):  # the client died mid-stream
                c.keeper.abort_upload(rnd, member.node_id, "broken_stream")
                context.abort(grpc.StatusCode.CANCELLED, "the upload stream broke off")
            reason = CODEC_REASON[e.reason]
            c.keeper.abort_upload(rnd, member.node_id, reason)
            context.abort(STATUS[reason], str(e))
        except Refusal as r:
            c.keeper.abort_upload(rnd, member.node_id, r.reason)
            self._abort(context, r)
        except Exception:  # the stream broke (client died or cancelled): keep nothing
            c.keeper.abort_upload(rnd, member.node_id, "broken_stream")
            raise
        try:
            c.keeper.finish_upload(rnd, upload)
        except Refusal as r:
            c.keeper.count_refusal(r.reason)
            self._abort(context, r)
        return pb.PushUpdateReply(accepted=True, round=rnd.round_id, bytes_received=upload.num_bytes,
                                  message="stored")


def _client_gone(context: grpc.ServicerContext, wait: float = 0.5) -> bool:
    """Whether a stream that ended early was cut by the client's death rather than closed
    on purpose: a dead client's call is cancelled within moments (the end of its stream can
    be seen a little before the cancellation), a live one waits for its answer."""
    end = time.monotonic() + wait
    while context.is_active():
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)
    return True


def grpc_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES)]


def serve(coord: Coordinator, host: str, port: int, max_workers: int) -> tuple[grpc.Server, int]:
    """Start the gRPC server on ``host:port`` (0 picks a free port); returns it and the port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=grpc_options())
    pb_grpc.add_FederationServicer_to_server(FederationServicer(coord), server)
    from .adversary import add_adversary_view  # only with [adversary] omniscient = true (simulation only)
    coord.adversary_view = add_adversary_view(server, coord)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    server.start()
    coord.ingest_address = f"{host}:{bound}"
    return server, bound
