"""Defense work split among W = 2 aggregation ranks against one rank, one thread each.

Two ranks (a gloo process group on 127.0.0.1, ``torch.set_num_threads(1)`` in
each, the orchestrator's heap settings) hold the same ``[n, d]`` float32
updates, laid out as ResNet-18 (102 tensors) or, for a smaller ``--d``, that
layout with every tensor scaled down. Per rule and per repetition, interleaved
in one sitting: rank 0 alone with ``RoundContext(shards=LOCAL)`` (W = 1, rank 1
waits at a barrier), then both ranks with ``DistShards`` (W = 2, barrier to
barrier, so the slower rank counts). Each is the best of ``--reps`` calls; the
W = 2 result is checked against the W = 1 one (equal, or within 1e-5).

Wall time is the figure; on a machine other tenants load, two ranks seldom get
two free cores at once, so the process CPU time of each call is recorded too
(W = 2: the busier rank's; waiting in a collective costs none): its ratio is
the speed-up two free cores would give.

    ./launch.sh bench split_defenses [--n 100] [--d 11M] [--reps 2] [--only median,krum]
                                     [--out results.json|results.csv]

Rules: median, trimmed mean (f = 30% of n), Krum, Layerwise Cosine Krum
(``{"layerwise": true, "distance": "cosine", "clip": "median"}``), Bulyan
(f = floor((n - 3) / 4)) and FedSECA; target: a 1.6x speed-up each.
Memory: each rank holds its own copy (n = 100, d = 11M: 4.4 GB each).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.defenses import RoundContext, build_defense  # noqa: E402
from orchestrator.defenses.base import LOCAL  # noqa: E402
from proto.layout import Layout  # noqa: E402

RULES = [("median", "median", {}), ("trimmed_mean", "trimmed_mean", {}), ("krum", "krum", {}),
         ("layerwise cosine krum", "krum", {"layerwise": True, "distance": "cosine", "clip": "median"}),
         ("bulyan", "bulyan", {}), ("fedseca", "fedseca", {})]
TARGET = 1.6


def parse_d(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def layout_for(d: int) -> Layout:
    """ResNet-18's layout (3x32x32 inputs, 10 classes), every tensor scaled to a total of about ``d``."""
    from fednode.workload.models import build_model

    full = Layout.from_module(build_model("resnet18", (3, 32, 32), 10))
    if d >= full.d:
        return full
    ratio = d / full.d
    return Layout.from_shapes([(layer.name, (max(1, round(layer.numel * ratio)),)) for layer in full],
                              buffers=frozenset(layer.name for layer in full if layer.is_buffer))


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    from orchestrator.coordinator import steady_heap
    from orchestrator.shards import DistShards

    steady_heap()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shards = DistShards()
        layout = layout_for(args["d"])
        n, d = args["n"], layout.d
        updates = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).mul_(1e-3)
        gw = torch.zeros(d)
        rows = []
        for label, name, params in RULES:
            if args["only"] and name not in args["only"] and label not in args["only"]:
                continue
            f = (n - 3) // 4 if name == "bulyan" else int(0.3 * n)
            rule = build_defense(name, params)
            times: dict[int, list[float]] = {1: [], 2: []}
            cpu: dict[int, list[float]] = {1: [], 2: []}
            deltas = {}
            for _ in range(args["reps"]):
                for w, sh in ((1, LOCAL), (2, shards)):
                    ctx = RoundContext(layout=layout, global_weights=gw, round=1, f=f, state={},
                                       generator=torch.Generator().manual_seed(1), shards=sh)
                    dist.barrier()
                    t, c = time.perf_counter(), time.process_time()
                    if w == 2 or rank == 0:
                        deltas[w] = rule(updates, ctx).delta
                    # W = 1: rank 0's CPU time (rank 1 only waits); W = 2: the busier rank's.
                    c = torch.tensor([time.process_time() - c if w == 2 or rank == 0 else 0.0], dtype=torch.float64)
                    dist.barrier()
                    times[w].append(time.perf_counter() - t)
                    dist.all_reduce(c, op=dist.ReduceOp.MAX)
                    cpu[w].append(float(c))
            same = bool(torch.equal(deltas[1], deltas[2])) if rank == 0 else None
            close = bool(torch.allclose(deltas[1], deltas[2], rtol=1e-5, atol=1e-5 * float(deltas[1].abs().max()))) \
                if rank == 0 else None
            rows.append({"rule": label, "name": name, "params": params, "f": f, "w1_s": min(times[1]),
                         "w2_s": min(times[2]), "speedup": min(times[1]) / min(times[2]), "equal": same,
                         "close": close, "w1_all": times[1], "w2_all": times[2], "w1_cpu_s": min(cpu[1]),
                         "w2_cpu_s": min(cpu[2]), "cpu_speedup": min(cpu[1]) / min(cpu[2])})
            if rank == 0:
                print(f"  {label}: W=1 {min(times[1]):.2f} s, W=2 {min(times[2]):.2f} s (CPU {min(cpu[1]):.2f} s, "
                      f"{min(cpu[2]):.2f} s)", flush=True)
            del deltas
        if rank == 0:
            Path(out).write_text(json.dumps({"n": n, "d": d, "layers": len(layout), "rows": rows}))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--d", default="11M", help="parameters: 11M (ResNet-18) or fewer, e.g. 4M, 500K")
    p.add_argument("--reps", type=int, default=2, help="best of this many calls per rule and world size")
    p.add_argument("--only", default="", help="comma-separated rule names or labels")
    p.add_argument("--out", default="", help="write the results here (.csv: a table; otherwise JSON)")
    a = p.parse_args(argv)
    args = {"n": a.n, "d": parse_d(a.d), "reps": a.reps,
            "only": {s.strip() for s in a.only.split(",") if s.strip()}}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; n = {a.n}, d ~ {args['d']:,}, 2 ranks x 1 thread "
          f"(gloo), best of {a.reps}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_rank, args=(2, port, args, out), nprocs=2, join=True, start_method="spawn")
        result = json.loads(Path(out).read_text())
    print(f"\nn = {result['n']}, d = {result['d']:,} ({result['layers']} tensors)\n")
    print("| rule | W=1 s | W=2 s | speed-up | target | CPU s W=1 / W=2 | CPU speed-up | same result |")
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for r in result["rows"]:
        ok = "yes" if r["speedup"] >= TARGET else "**no**"
        same = "bit-for-bit" if r["equal"] else ("within 1e-5" if r["close"] else "**differs**")
        print(f"| {r['rule']} | {r['w1_s']:.2f} | {r['w2_s']:.2f} | {r['speedup']:.2f}x | >= {TARGET}x: {ok} | "
              f"{r['w1_cpu_s']:.2f} / {r['w2_cpu_s']:.2f} | {r['cpu_speedup']:.2f}x | {same} |")
    if a.out:
        path = Path(a.out)
        if path.suffix == ".csv":
            with path.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["rule", "n", "d", "f", "w1_s", "w2_s", "speedup", "w1_cpu_s", "w2_cpu_s", "cpu_speedup",
                            "equal"])
                for r in result["rows"]:
                    w.writerow([r["rule"], result["n"], result["d"], r["f"], f"{r['w1_s']:.4f}", f"{r['w2_s']:.4f}",
                                f"{r['speedup']:.3f}", f"{r['w1_cpu_s']:.4f}", f"{r['w2_cpu_s']:.4f}",
                                f"{r['cpu_speedup']:.3f}", r["equal"]])
        else:
            path.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
