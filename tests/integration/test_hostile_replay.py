"""Replayed uploads (real gRPC server and clients on 127.0.0.1).

Observed before: an upload captured from a node and re-sent with its round and model
version rewritten, under the same session token, was accepted. Each upload now echoes
the random nonce of the task it answers (``TaskHeader.upload_nonce``: per node and round,
or per async ticket); a replay, or an upload without the nonce, is refused.
"""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.servicer import serve
from proto import codec
from tests.integration.harness import scenario

C = grpc.StatusCode


def _federation(tmp_path, **fed):
    s = scenario(roles=[{"name": "n", "count": 2}], federation={"lease_seconds": 60.0, "buffer_size": 1, **fed})
    coord = Coordinator(s, tmp_path, "tok")
    server, port = serve(coord, "127.0.0.1", 0, 20)
    client = FederationClient(f"127.0.0.1:{port}")
    client.join("n-000", "secret", "tok", num_samples=10)
    return coord, server, client


class Capture:
    """What a node sent on the wire for one upload: its header and chunks (as a sniffer has them)."""

    def __init__(self, client: FederationClient, task, delta: torch.Tensor) -> None:
        self.buf = codec.tensor_bytes(delta)
        self.header = client.update_header(task.round, task.model_version, self.buf, 10)
        self.chunks = list(codec.iter_chunks(self.buf, 4096))

    def resend(self, client: FederationClient, round_id: int, version: int, nonce=None):
        h = type(self.header)()
        h.CopyFrom(self.header)
        h.round, h.model_version = round_id, version
        if nonce is not None:
            h.upload_nonce = nonce
        return client.push_raw(h, iter(self.chunks), timeout=10)


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_a_sync_upload_replayed_in_a_later_round_is_refused(tmp_path):
    coord, server, client = _federation(tmp_path)
    try:
        node = client.session.node_id
        coord.open_round(0, {node}, 60.0, 1.0)
        t0 = client.get_task(wait_seconds=5)
        assert t0.kind == "train" and len(t0.upload_nonce) == 32
        sent = Capture(client, t0, torch.full((coord.layout.d,), 0.5))
        assert sent.resend(client, 0, 0).accepted  # the real upload, as sent
        coord.keeper.wait_close(lambda n: True)
        coord.store.seal()
        coord.store.drop()
        coord.round_id = 1
        rnd = coord.open_round(1, {node}, 60.0, 1.0)
        # the captured stream again, round and version rewritten, same session token
        e = _refused(lambda: sent.resend(client, 1, 0))
        assert e.code() == C.PERMISSION_DENIED and "replayed or forged" in e.details(), e.details()
        e = _refused(lambda: sent.resend(client, 1, 0, nonce=""))
        assert e.code() == C.PERMISSION_DENIED and "carries no upload_nonce" in e.details(), e.details()
        assert node not in rnd.uploads and rnd.refused == {"permission_denied": 2}
        t1 = client.get_task(wait_seconds=5)
        assert t1.round == 1 and t1.upload_nonce != t0.upload_nonce
        assert client.push_update(1, 0, torch.zeros(coord.layout.d), 10).accepted  # the node's own upload
        assert node in rnd.uploads
    finally:
        client.close()
        server.stop(0)


def test_an_async_upload_replayed_after_its_ticket_was_used_is_refused(tmp_path):
    coord, server, client = _federation(tmp_path, mode="async", max_staleness=5)
    try:
        node = client.session.node_id
        coord.store.open_pool(2)
        coord.keeper.publish(0, 0, coord.weights_payload(0))
        t0 = client.get_task(wait_seconds=5)
        assert t0.kind == "train" and t0.model_version == 0 and t0.upload_nonce
        sent = Capture(client, t0, torch.full((coord.layout.d,), 0.25))
        assert sent.resend(client, 0, 0).accepted
        e = _refused(lambda: sent.resend(client, 0, 0))  # while its update waits in the buffer
        assert e.code() == C.ALREADY_EXISTS
        taken, outcome, _ = coord.keeper.wait_buffer(1.0, 1.0, threading.Event(), lambda n: True)
        assert outcome == "complete" and [b.upload.node_id for b in taken] == [node]
        coord.store.release(node)
        coord.keeper.publish(1, 1, coord.weights_payload(0))
        for version in (0, 1):  # as it was (staleness 1 is allowed) and with its version rewritten
            e = _refused(lambda: sent.resend(client, 1, version))
            assert e.code() == C.PERMISSION_DENIED and "used or never issued" in e.details(), e.details()
        t1 = client.get_task(wait_seconds=5)
        assert t1.model_version == 1 and t1.upload_nonce != t0.upload_nonce
        assert client.push_update(t1.round, 1, torch.zeros(coord.layout.d), 10).accepted
    finally:
        client.close()
        server.stop(0)
