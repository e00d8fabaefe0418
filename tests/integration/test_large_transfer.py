"""Chunked transfer of a 300 MB model both ways through the real gRPC server.

gRPC messages are capped far below this (8 MiB here, 2 GiB by protobuf), so the
test proves the chunking that makes any model size transferable.
"""
import torch

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.scenario import from_dict
from orchestrator.servicer import serve
from proto import codec
from proto.layout import Layout


def test_300mb_update_and_weights_cross_the_wire(tmp_path):
    d = 300 * 1000 * 1000 // 4 + 3  # 300 MB and not a multiple of the chunk size
    assert 4 * d > 30 * codec.MAX_MESSAGE_BYTES
    s = from_dict({"name": "big", "model": {"name": "logreg"}, "roles": [{"name": "big", "count": 1}],
                   "output": {"live": False, "plot": False}})
    coord = Coordinator(s, tmp_path, "tok")
    coord.use_layout(Layout.from_shapes([("embedding", (d - 10,)), ("head", (10,))]),
                     torch.arange(d, dtype=torch.float32).mul_(1e-6))
    server, port = serve(coord, "127.0.0.1", 0, 4)
    try:
        client = FederationClient(f"127.0.0.1:{port}")
        sess = client.join("big-000", "s", "tok")
        assert sess.layout.d == d
        coord.open_round(0, {sess.node_id}, 600, 1.0)
        task = client.get_task(wait_seconds=5)
        assert task.kind == "train" and torch.equal(task.weights, coord.model.weights)
        delta = torch.linspace(-1, 1, d)
        reply = client.push_update(0, 0, delta, 1)
        assert reply.accepted and reply.bytes_received == 4 * d
        assert sess.node_id in coord.keeper.current.uploads and torch.equal(coord.store.row(sess.node_id), delta)
        client.close()
    finally:
        server.stop(0)
