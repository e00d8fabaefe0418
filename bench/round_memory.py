"""Orchestrator peak memory per round: real rounds, real gRPC uploads on 127.0.0.1.

The orchestrator (a ``Coordinator`` driving its rounds with the mean, serving
gRPC in this process) aggregates ``n`` uploads of the demo's CNN
(d = 1,625,866 float32) per round; one client process holds ``n`` sessions and
pushes one delta per session per round (threads, so uploads overlap as they do
with real nodes). A sampler thread reads this process's RSS every 5 ms; each
round reports its peak above the RSS when the round opened, in bytes and in
units of one ``n x d`` float32 matrix.

    ./launch.sh bench round_memory --nodes 20 100 --rounds 3

The script uses only interfaces that exist before and after the row store
(``Coordinator(..).run()``, ``servicer.serve``, ``fednode.client``), so the
same file measures an older checkout: ``cd OLD && python /path/to/round_memory.py``.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler:
    def __init__(self) -> None:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def reset(self) -> None:
        self.base = self.peak = rss()


def _clients(address: str, token: str, names: list[str], rounds: int, seed: int) -> None:
    """One process, one session per name: fetch each round's task, push a delta."""
    import grpc
    import torch

    from fednode.client import FederationClient

    torch.set_num_threads(1)
    clients = []
    for name in names:
        c = FederationClient(address)
        c.join(name, f"secret-{name}", token)
        clients.append(c)
    d = clients[0].session.layout.d
    delta = torch.randn(d, generator=torch.Generator().manual_seed(seed)).mul_(1e-3)

    def one(c: FederationClient) -> None:
        done = -1
        while done < rounds - 1:
            try:
                t = c.get_task(wait_seconds=5.0)
            except grpc.RpcError:
                return
            if t.kind == "shutdown":
                return
            if t.kind == "train" and t.round > done:
                c.push_update(t.round, t.model_version, delta, 10)
                done = t.round

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(n: int, rounds: int) -> dict:
    from rich.console import Console  # noqa: F401 (imported before the baseline, as the runner does)

    from orchestrator.coordinator import Coordinator
    from orchestrator.scenario import from_dict
    from orchestrator.servicer import serve

    s = from_dict({"name": f"mem-{n}", "model": {"name": "cnn"}, "defense": {"name": "mean"},
                   "federation": {"rounds": rounds, "round_timeout": 120.0, "quorum": 1.0, "lease_seconds": 60.0},
                   "roles": [{"name": "m", "count": n}], "output": {"live": False, "plot": False,
                                                                     "checkpoint_every": 0}})
    peaks: list[dict] = []
    sampler: list[Sampler] = []

    def on_event(kind: str, info: dict) -> None:
        if kind == "round_open" and sampler:
            sampler[0].reset()
        elif kind == "round_closed" and sampler:
            smp = sampler[0]
            peaks.append({"round": info["round"], "reported": info.get("reported"), "peak_above_open": smp.peak - smp.base})

    with tempfile.TemporaryDirectory() as tmp:
        coord = Coordinator(s, Path(tmp), "bench-token", on_event=on_event)
        d = coord.layout.d
        server, port = serve(coord, "127.0.0.1", 0, 2 * n + 16)
        names = [name for name, _ in s.node_roles()]
        proc = mp.get_context("spawn").Process(target=_clients, args=(f"127.0.0.1:{port}", "bench-token", names,
                                                                     rounds, 0))
        proc.start()
        sampler.append(Sampler())
        t0 = time.monotonic()
        summary = coord.run()
        wall = time.monotonic() - t0
        proc.join(60)
        server.stop(0)
    matrix = n * d * 4
    return {"n": n, "d": d, "rounds": summary["rounds_completed"], "wall_s": round(wall, 2),
            "per_round": [{**p, "peak_MB": round(p["peak_above_open"] / 2**20, 1),
                           "x_nd": round(p["peak_above_open"] / matrix, 2)} for p in peaks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    out = []
    for n in args.nodes:
        r = measure(n, args.rounds)
        out.append(r)
        rows = ", ".join(f"r{p['round']}: {p['peak_MB']} MB = {p['x_nd']} x nd" for p in r["per_round"])
        print(f"n={n} d={r['d']}: peak RSS above round open: {rows} (wall {r['wall_s']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.stdout = io.TextIOWrapper(sys.stdout.buffer, line_buffering=True)
    main()
