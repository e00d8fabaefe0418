"""Upload throughput: a 45 MB update through ``PushUpdate`` vs a raw TCP copy.

The receiver (orchestrator gRPC server / raw socket server) runs in this
process and the sender in a second process, as a node would; the two paths are
interleaved in one run, so the ratio is what matters on a noisy machine. The gRPC path
includes everything the orchestrator does to an upload: authentication, round
checks, chunk assembly, CRC-32 and the finiteness check.

    ./launch.sh bench transport [--mb 45] [--repeats 7] [--chunk-kib 1024]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednode.client import FederationClient  # noqa: E402
from orchestrator.coordinator import Coordinator  # noqa: E402
from orchestrator.scenario import from_dict  # noqa: E402
from orchestrator.servicer import serve  # noqa: E402
from proto import codec  # noqa: E402
from proto.layout import Layout  # noqa: E402


def synthetic_coordinator(d: int, run_dir: Path) -> Coordinator:
    s = from_dict({"name": "bench", "model": {"name": "logreg"}, "roles": [{"name": "bench", "count": 1}],
                   "output": {"live": False, "plot": False}})
    coord = Coordinator(s, run_dir, "bench-token")
    coord.use_layout(Layout.from_shapes([("w", (d,))]), torch.zeros(d))
    return coord


def _client(conn, grpc_address: str, sock_address: tuple[str, int], d: int, repeats: int, chunk_bytes: int) -> None:
    """The uploading side, in its own process (a node is its own process)."""
    torch.set_num_threads(1)
    payload = torch.randn(d, generator=torch.Generator().manual_seed(0))
    data = codec.tensor_bytes(payload)
    client = FederationClient(grpc_address, chunk_bytes=chunk_bytes)
    client.join("bench-000", "secret", "bench-token")
    conn.send(client.session.node_id)
    sock_t, grpc_t = [], []
    for i in range(2 * (repeats + 1)):
        path = "socket" if i % 2 == 0 else "grpc"  # interleaved: load drift hits both
        if path == "socket":
            t0 = time.perf_counter()
            with socket.create_connection(sock_address) as s:
                s.sendall(data)
                assert s.recv(1) == b"k"
            dt = time.perf_counter() - t0
            out = sock_t
        else:
            r = conn.recv()  # the round the orchestrator opened for us
            t0 = time.perf_counter()
            reply = client.push_update(r, 0, payload, 1)
            dt = time.perf_counter() - t0
            assert reply.accepted and reply.bytes_received == 4 * d
            conn.send("done")
            out = grpc_t
        if i >= 2:  # the first pair is a warm-up
            out.append(dt)
    client.close()
    conn.send((sock_t, grpc_t))


def run(d: int, repeats: int, chunk_bytes: int) -> tuple[list[float], list[float]]:
    payload = torch.randn(d, generator=torch.Generator().manual_seed(0))
    n = 4 * d
    listener = socket.create_server(("127.0.0.1", 0))

    def receiver():
        for _ in range(repeats + 1):
            conn, _ = listener.accept()
            buf = bytearray(n)
            view, got = memoryview(buf), 0
            while got < n:
                k = conn.recv_into(view[got:], min(n - got, 1 << 20))
                if not k:
                    raise RuntimeError("peer closed early")
                got += k
            conn.sendall(b"k")
            conn.close()

    threading.Thread(target=receiver, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        coord = synthetic_coordinator(d, Path(tmp))
        server, port = serve(coord, "127.0.0.1", 0, 8)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client, args=(child, f"127.0.0.1:{port}", listener.getsockname(), d, repeats,
                                                 chunk_bytes))
        proc.start()
        node_id = parent.recv()
        for r in range(repeats + 1):
            coord.open_round(r, {node_id}, 600, 1.0)
            parent.send(r)
            assert parent.recv() == "done"
            rnd = coord.keeper.wait_close(lambda _: True)
            assert node_id in rnd.uploads and torch.equal(coord.store.row(node_id), payload)
        sock_t, grpc_t = parent.recv()
        proc.join()
        server.stop(0)
    listener.close()
    return sock_t, grpc_t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=45.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chunk-kib", type=int, default=codec.DEFAULT_CHUNK_BYTES // 1024)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    d = int(args.mb * 1e6 / 4)
    mb = 4 * d / 1e6
    sock, grpc_t = run(d, args.repeats, args.chunk_kib * 1024)
    s_med, g_med = statistics.median(sock), statistics.median(grpc_t)
    res = {"megabytes": round(mb, 1), "chunk_kib": args.chunk_kib,
           "socket_MBps": round(mb / s_med, 1), "grpc_MBps": round(mb / g_med, 1),
           "grpc_over_socket": round(s_med / g_med, 3),
           "socket_s": [round(x, 4) for x in sock], "grpc_s": [round(x, 4) for x in grpc_t]}
    print(f"payload {mb:.1f} MB, chunks of {args.chunk_kib} KiB, median of {len(sock)} runs each")
    print(f"  raw TCP socket : {res['socket_MBps']:8.1f} MB/s")
    print(f"  gRPC PushUpdate: {res['grpc_MBps']:8.1f} MB/s   ({100 * res['grpc_over_socket']:.0f}% of the socket)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
