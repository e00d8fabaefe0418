"""Many sessions on one orchestrator: a load generator of joined, heartbeating, long-polling sessions.

    ./launch.sh bench sessions                                  # 10,000 sessions + a 10-node federation
    ./launch.sh bench sessions --sessions 2000 --procs 2 --rounds 5

Starts ``./launch.sh run`` on a scenario written to ``OUT/scenario.toml``: ``--nodes`` real
node processes (an MLP on MNIST-5k, every round selects all of them) plus a role of
``--sessions`` load sessions (``roles.load = true``: the launcher does not start them and
rounds never select them; ``federation.min_nodes`` makes round 0 wait until every one of
them has joined). ``--procs`` load-generator processes (this file, ``--worker``) each hold
their share of the sessions on ``--channels`` ``grpc.aio`` channels (many sessions per HTTP/2
connection, as a NAT or a gateway would multiplex them), and for every session:

* join once (at most ``--join-concurrency`` joins in flight per process);
* heartbeat every ``lease / 3`` (the nodes' pace, a random phase per session), taking the
  rotated session token when a reply carries one; every heartbeat's latency is recorded;
* keep one ``GetTask`` long-poll open (20 s, the server's longest), opening the next when one
  answers.

A heartbeat answered ``NOT_FOUND`` (the session was evicted) counts as an eviction and the
session joins again. Everything is on 127.0.0.1, bounded in count (``--sessions``) and time
(``--max-seconds``). The bench samples the orchestrator's RSS and open file descriptors every
``--interval`` seconds, reads the run's ``metrics.jsonl`` (rounds completed, nodes evicted), and
writes ``OUT/sessions.json`` plus a Markdown table for BENCHMARKS.md. Heartbeat latency is
reported over the rounds only (from round 0's start to the run's end), when every session has
joined and the federation is training.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POLL_SECONDS = 20.0  # the server's longest long-poll (servicer.MAX_WAIT_SECONDS)


# --------------------------------------------------------------------------- the load generator
async def _session(stub, pb, name: str, token: str, lease_box: list, stop: asyncio.Event, sem: asyncio.Semaphore,
                   out: dict, protocol: int) -> None:
    import grpc

    secret = secrets.token_hex(8)

    async def join() -> tuple[str, str] | None:
        req = pb.JoinRequest(credentials=pb.Credentials(node_name=name, node_secret=secret, federation_token=token),
                             device="cpu", cpu_cores=1, protocol_version=protocol)
        for attempt in range(8):
            if stop.is_set():
                return None
            async with sem:
                try:
                    reply = await stub.Join(req, timeout=60)
                    lease_box[0] = reply.lease_seconds or lease_box[0]
                    return reply.node_id, reply.session_token
                except grpc.aio.AioRpcError as e:
                    out["errors"][f"join {e.code().name}"] = out["errors"].get(f"join {e.code().name}", 0) + 1
            await asyncio.sleep(min(8.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
        return None

    joined = await join()
    if joined is None:
        out["join_failed"] += 1
        return
    out["joined"] += 1
    box = {"id": joined[0], "token": joined[1]}

    async def heartbeats() -> None:
        period = lease_box[0] / 3
        await asyncio.sleep(random.random() * min(1.0, period))  # the first within a second of the join, then
        # every period from there: random phases, as the nodes' beats do not line up either
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                reply = await stub.Heartbeat(pb.HeartbeatRequest(
                    session=pb.Session(node_id=box["id"], session_token=box["token"])), timeout=30)
                out["latency"].append((time.time(), time.monotonic() - t0))
                if reply.session_token:
                    box["token"] = reply.session_token
                if reply.shutdown:
                    stop.set()
                    return
            except grpc.aio.AioRpcError as e:
                key = f"heartbeat {e.code().name}"
                out["errors"][key] = out["errors"].get(key, 0) + 1
                if e.code() == grpc.StatusCode.NOT_FOUND:  # evicted: join again
                    out["evicted"] += 1
                    again = await join()
                    if again is None:
                        return
                    box["id"], box["token"] = again
            await asyncio.sleep(max(0.0, period - (time.monotonic() - t0)))

    async def polls() -> None:
        while not stop.is_set():
            out["polls_opened"] += 1
            try:
                call = stub.GetTask(pb.GetTaskRequest(session=pb.Session(node_id=box["id"],
                                                                         session_token=box["token"]),
                                                      wait_seconds=POLL_SECONDS), timeout=POLL_SECONDS + 60)
                async for chunk in call:
                    kind = chunk.header.kind
                    if kind == pb.TaskHeader.SHUTDOWN:
                        stop.set()
                    elif kind == pb.TaskHeader.TRAIN:
                        out["tasks"] += 1  # never expected: rounds do not select load sessions
                    break
                call.cancel()
                out["polls"] += 1
            except grpc.aio.AioRpcError as e:
                key = f"poll {e.code().name}"
                out["errors"][key] = out["errors"].get(key, 0) + 1
                gone = box["id"]
                for _ in range(20):  # evicted: the heartbeats join again; poll under the new session
                    await asyncio.sleep(0.5 + random.random())
                    if box["id"] != gone or e.code() != grpc.StatusCode.NOT_FOUND or stop.is_set():
                        break

    await asyncio.gather(heartbeats(), polls())


async def _worker(address: str, token: str, names: list[str], channels: int, lease: float, max_seconds: float,
                  join_concurrency: int, stats: Path) -> None:
    import grpc

    from fednode.client import PROTOCOL_VERSION
    from proto.byzfed.v1 import federation_pb2 as pb
    from proto.byzfed.v1 import federation_pb2_grpc as pb_grpc

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    chans = [grpc.aio.insecure_channel(address) for _ in range(max(1, channels))]
    stubs = [pb_grpc.FederationStub(c) for c in chans]
    out = {"sessions": len(names), "joined": 0, "join_failed": 0, "evicted": 0, "tasks": 0, "polls": 0, "polls_opened": 0,
           "errors": {}, "latency": []}
    sem = asyncio.Semaphore(max(1, join_concurrency))
    lease_box = [lease]
    tasks = [asyncio.create_task(_session(stubs[i % len(stubs)], pb, n, token, lease_box, stop, sem, out,
                                          PROTOCOL_VERSION)) for i, n in enumerate(names)]
    t0 = time.monotonic()
    last = 0.0
    while not stop.is_set() and time.monotonic() - t0 < max_seconds:
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - last > 5:  # progress for the parent: joined so far
            last = time.monotonic()
            stats.with_suffix(".progress").write_text(json.dumps({k: out[k] for k in ("joined", "join_failed",
                                                                                       "evicted")}))
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in chans:
        await c.close()
    stats.write_text(json.dumps(out))


def worker_main(args) -> int:
    names = [f"load-{i:03d}" for i in range(args.first, args.first + args.count)]
    token = os.environ["BYZFED_TOKEN"]
    asyncio.run(_worker(args.address, token, names, args.channels, args.lease, args.max_seconds,
                        args.join_concurrency, Path(args.stats)))
    return 0


# --------------------------------------------------------------------------- the bench
SCENARIO = """\
# written by bench/sessions.py
name = "sessions"
seed = 0

[model]
name = "mlp"

[data]
dataset = "mnist5k"
partition = "iid"

[training]
epochs = 1
batch_size = 32
lr = 0.05

[federation]
rounds = {rounds}
selection = "all"
quorum = 1.0
round_timeout = 120.0
lease_seconds = {lease}
min_nodes = {min_nodes}
join_timeout = {join_timeout}
host = "127.0.0.1"
port = {port}

[defense]
name = "median"

[adversary]
collusion = "off"

[output]
live = false
plot = false

[[roles]]
name = "honest"
count = {nodes}

[[roles]]
name = "load"
count = {sessions}
load = true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def run_bench(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    port = free_port()
    (out / "scenario.toml").write_text(SCENARIO.format(
        rounds=args.rounds, lease=args.lease, min_nodes=args.sessions + args.nodes, join_timeout=args.max_seconds,
        port=port, nodes=args.nodes, sessions=args.sessions))
    token = secrets.token_hex(16)
    env = {**os.environ, "BYZFED_TOKEN": token}
    log = open(out / "orchestrator.log", "w")
    cmd = [str(ROOT / "launch.sh"), "run", str(out / "scenario.toml"), "--run-dir", str(run_dir)]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    orch = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    workers: list[tuple[subprocess.Popen, Path]] = []
    samples: list[dict] = []
    first_row_unix = None  # when the bench first saw round 0's row (its start: that minus its phases)
    try:
        deadline = t0 + 120
        while time.monotonic() < deadline and orch.poll() is None:  # the server is up when its port answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        per = -(-args.sessions // args.procs)
        for k in range(args.procs):
            first, count = k * per, min(per, args.sessions - k * per)
            if count <= 0:
                break
            stats = out / f"worker-{k}.json"
            stats.unlink(missing_ok=True)
            w = subprocess.Popen([sys.executable, __file__, "--worker", "--address", f"127.0.0.1:{port}",
                                  "--first", str(first), "--count", str(count), "--channels", str(args.channels),
                                  "--lease", str(args.lease), "--max-seconds", str(args.max_seconds),
                                  "--join-concurrency", str(args.join_concurrency), "--stats", str(stats)],
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            workers.append((w, stats))
        last_print = 0.0
        while orch.poll() is None and time.monotonic() - t0 < args.max_seconds:
            rows = rows_of(run_dir)
            if rows and first_row_unix is None:
                first_row_unix = time.time()
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(orch.pid),
                            "fds": open_fds(orch.pid), "rounds": len(rows)})
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                joined = 0
                for _, stats in workers:
                    try:
                        joined += json.loads(stats.with_suffix(".progress").read_text())["joined"]
                    except (OSError, ValueError, KeyError):
                        pass
                print(f"  t={samples[-1]['t']:.0f}s sessions joined {joined}/{args.sessions}, rounds {len(rows)}, "
                      f"orchestrator RSS {samples[-1]['rss_mb'] or 0:.0f} MB, fds {samples[-1]['fds']}", flush=True)
            time.sleep(args.interval)
    finally:
        if orch.poll() is None:
            orch.send_signal(signal.SIGINT)
            try:
                orch.wait(30)
            except subprocess.TimeoutExpired:
                orch.kill()
                orch.wait()
        for w, _ in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w, _ in workers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    wall = time.monotonic() - t0
    rows = rows_of(run_dir)
    totals = {"sessions": 0, "joined": 0, "join_failed": 0, "evicted": 0, "tasks": 0, "polls": 0, "polls_opened": 0}
    errors: dict[str, int] = {}
    latency_all, latency_rounds = [], []
    first_round_unix = None if first_row_unix is None or not rows else \
        first_row_unix - sum(float(rows[0].get(k) or 0) for k in ("t_collect", "t_aggregate", "t_evaluate"))
    for _, stats in workers:
        try:
            st = json.loads(stats.read_text())
        except (OSError, ValueError):
            errors["worker wrote no stats"] = errors.get("worker wrote no stats", 0) + 1
            continue
        for k in totals:
            totals[k] += st.get(k, 0)
        for k, v in st.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
        for when, lat in st.get("latency", []):
            latency_all.append(lat)
            if first_round_unix is not None and when >= first_round_unix:
                latency_rounds.append(lat)
    completed = [r for r in rows if r.get("outcome") == "complete" and r.get("accuracy") is not None]
    evicted_nodes = sorted({n for r in rows for n in (r.get("evicted") or [])})
    rss = [s["rss_mb"] for s in samples if s["rss_mb"]]
    fds = [s["fds"] for s in samples if s["fds"] is not None]
    ms = lambda v: round(1000 * v, 1)  # noqa: E731
    result = {
        "command": " ".join(sys.argv), "orchestrator_exit": orch.returncode, "wall_seconds": round(wall, 1),
        "sessions": args.sessions, "procs": args.procs, "channels_per_proc": args.channels, "nodes": args.nodes,
        "lease_seconds": args.lease, **{f"sessions_{k}": v for k, v in totals.items() if k != "sessions"},
        "errors": errors, "rounds_wanted": args.rounds, "rounds_completed": len(completed),
        "final_accuracy": completed[-1]["accuracy"] if completed else None,
        "evicted_in_metrics": len(evicted_nodes), "evicted_examples": evicted_nodes[:5],
        "heartbeats_during_rounds": len(latency_rounds),
        "heartbeat_latency_ms_during_rounds": {"p50": ms(pct(latency_rounds, 0.5)), "p99": ms(pct(latency_rounds, 0.99)),
                                               "max": ms(max(latency_rounds, default=float("nan")))},
        "heartbeat_latency_ms_all": {"count": len(latency_all), "p50": ms(pct(latency_all, 0.5)),
                                     "p99": ms(pct(latency_all, 0.99))},
        "orchestrator_rss_mb": {"first": round(rss[0], 1) if rss else None, "max": round(max(rss), 1) if rss else None,
                                "last": round(rss[-1], 1) if rss else None},
        "orchestrator_fds": {"first": fds[0] if fds else None, "max": max(fds) if fds else None,
                             "last": fds[-1] if fds else None},
        "round_seconds": {"median": round(statistics.median(_round_walls(rows)), 2) if _round_walls(rows) else None},
    }
    (out / "sessions.json").write_text(json.dumps({**result, "samples": samples}, indent=2) + "\n")
    return result


def _round_walls(rows: list[dict]) -> list[float]:
    walls = [r["wall"] for r in rows if r.get("wall") is not None]
    return [b - a for a, b in zip(walls, walls[1:])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=4, help="load-generator processes")
    p.add_argument("--channels", type=int, default=25, help="grpc.aio channels per load-generator process")
    p.add_argument("--nodes", type=int, default=10, help="real node processes of the federation")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--lease", type=float, default=60.0, help="federation.lease_seconds (sessions beat every lease/3)")
    p.add_argument("--join-concurrency", type=int, default=64, help="joins in flight per generator process")
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop everything after this long")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-sessions"))
    # worker mode (started by the bench itself)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not 1 <= args.sessions <= 100_000 or not 1 <= args.procs <= 64:
        p.error("--sessions must be in 1 .. 100000 and --procs in 1 .. 64")
    r = run_bench(args)
    print(json.dumps(r, indent=2))
    lat = r["heartbeat_latency_ms_during_rounds"]
    print("\n| figure | value |\n| --- | --- |")
    print(f"| sessions joined / wanted | {r['sessions_joined']} / {r['sessions']} ({r['procs']} processes x "
          f"{r['channels_per_proc']} channels) |")
    print(f"| rounds completed / wanted | {r['rounds_completed']} / {r['rounds_wanted']} (final accuracy "
          f"{r['final_accuracy']}) |")
    print(f"| heartbeat latency during rounds, p50 / p99 / max | {lat['p50']} / {lat['p99']} / {lat['max']} ms "
          f"({r['heartbeats_during_rounds']} heartbeats) |")
    print(f"| sessions evicted (heartbeat NOT_FOUND) / nodes evicted in metrics | {r['sessions_evicted']} / "
          f"{r['evicted_in_metrics']} |")
    print(f"| orchestrator RSS first / max / last | {r['orchestrator_rss_mb']['first']} / "
          f"{r['orchestrator_rss_mb']['max']} / {r['orchestrator_rss_mb']['last']} MB |")
    print(f"| orchestrator open fds first / max / last | {r['orchestrator_fds']['first']} / "
          f"{r['orchestrator_fds']['max']} / {r['orchestrator_fds']['last']} |")
    print(f"| errors | {r['errors'] or 'none'} |")
    ok = (r["sessions_joined"] == r["sessions"] and r["rounds_completed"] == r["rounds_wanted"]
          and r["sessions_evicted"] == 0 and r["evicted_in_metrics"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
