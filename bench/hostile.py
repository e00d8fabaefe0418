"""Hostile calls against a live federation: do honest nodes keep their latency?

A 6-node federation (real ``fednode`` processes, MLP on MNIST-5k, the orchestrator's
gRPC server and rounds in this process, as ``tests/integration/harness.py`` runs it)
trains for ``--rounds`` rounds twice: once without and once with hostile load. Two
more roster members are processes of this script:

* ``probe-000``, honest: heartbeats every 0.2 s and records each heartbeat's latency
  (the figure below), and takes part in every round with a zero update;
* ``hostile-000`` (with load only): one process that keeps ``--streams`` idle
  ``PushUpdate`` streams open (no header, so no token: re-opened whenever the server
  cuts one) and, as an authenticated member, ``--polls`` concurrent ``GetTask``
  long-polls, re-opened 0.5 s after each ends, that it never reads past their first
  message (held up to 20 s, then cancelled), except one per round: it reads that task
  and uploads a zero update, so rounds can complete.

Every process is stopped by PID; every loop is bounded in count and time.

    ./launch.sh bench hostile [--rounds 100] [--streams 1000] [--polls 50] [--json out.json]

The script uses only interfaces that exist before and after the ``grpc.aio`` server
(``tests.integration.harness``, ``servicer.serve``, ``fednode.client``), so the same
file measures an older checkout: ``cd OLD && python /path/to/hostile.py``.

The two client roles run as ``python hostile.py probe ...`` and ``python hostile.py
hostile ...`` (``tests/integration/test_hostile_load.py`` starts them the same way).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.getcwd())  # an older checkout when run from it

SCRIPT = Path(__file__).resolve()
HONEST = 6
HOLD = 20.0
"""How long the hostile member holds a task stream it does not read (the server cuts it after
its ``idle_seconds``, 15 s by default), before it cancels it."""


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


# --------------------------------------------------------------------------- the probe (honest)

def probe_main(address: str, name: str, token: str, seconds: float, out: str, period: float = 0.2) -> int:
    """Join as ``name``; heartbeat every ``period`` s recording latencies; take part in every
    round with a zero update. Writes ``out`` (JSON) at SIGTERM or after ``seconds``."""
    import grpc
    import numpy as np

    from fednode.client import FederationClient
    from proto import codec

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = FederationClient(address)
    end = time.monotonic() + seconds
    for _ in range(600):  # the orchestrator may still be starting (bounded: ~60 s)
        try:
            sess = client.join(name, "probe-secret", token, num_samples=10)
            break
        except grpc.RpcError:
            if stop.wait(0.1):
                return 1
    else:
        return 1
    lat: list[tuple[float, float]] = []  # (time since start, seconds)
    failures: Counter[str] = Counter()
    t0 = time.monotonic()

    def beat() -> None:
        while not stop.is_set() and time.monotonic() < end:
            s = time.monotonic()
            try:
                client.heartbeat(timeout=5.0)
                lat.append((s - t0, time.monotonic() - s))
            except grpc.RpcError as e:
                failures[e.code().name] += 1
            stop.wait(max(0.0, period - (time.monotonic() - s)))

    threading.Thread(target=beat, daemon=True).start()
    zeros = np.zeros(sess.layout.d, dtype="<f4")
    buf = memoryview(zeros).cast("B")
    done: set[int] = set()
    uploads = 0
    while not stop.is_set() and time.monotonic() < end:
        try:
            task = client.get_task(wait_seconds=min(5.0, max(0.1, end - time.monotonic())), timeout=30.0)
        except grpc.RpcError as e:
            failures["get_task:" + e.code().name] += 1
            stop.wait(0.2)
            continue
        if task.kind == "shutdown":
            break
        if task.kind != "train" or task.round in done:
            if task.kind == "train":
                stop.wait(0.2)
            continue
        done.add(task.round)
        try:
            client.push_raw(client.update_header(task.round, task.model_version, buf, 10),
                            codec.iter_chunks(buf), timeout=30.0)
            uploads += 1
        except grpc.RpcError as e:
            failures["push:" + e.code().name] += 1
    stop.set()
    Path(out).write_text(json.dumps({"latencies": lat, "failures": dict(failures), "uploads": uploads}))
    client.close()
    return 0


# --------------------------------------------------------------------------- the hostile process

def hostile_main(address: str, name: str, token: str, streams: int, polls: int, seconds: float, out: str,
                 channels: int = 10) -> int:
    """``streams`` idle upload streams with no header (kept open: re-opened when cut), and as
    member ``name`` (when ``polls`` > 0) that many concurrent GetTask long-polls read only up
    to their first message. Writes ``out`` (JSON) at SIGTERM or after ``seconds``."""
    import grpc
    import numpy as np

    from proto import codec
    from proto.byzfed.v1 import federation_pb2 as pb

    return asyncio.run(_hostile(address, name, token, streams, polls, seconds, out, channels, grpc, np, codec, pb))


async def _hostile(address, name, token, streams, polls, seconds, out, channels, grpc, np, codec, pb) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    end = time.monotonic() + seconds
    opts = [("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES)]
    chans = [grpc.aio.insecure_channel(address, options=opts + [("grpc.channel_id", i)]) for i in range(channels)]
    stats: dict[str, Any] = {"streams_open": 0, "streams_open_max": 0, "streams_opened": 0,
                             "stream_ends": Counter(), "polls_opened": 0, "poll_ends": Counter(),
                             "uploads": Counter(), "samples": []}

    def left() -> float:
        return end - time.monotonic()

    async def idle_stream(i: int) -> None:
        push = chans[i % channels].stream_unary("/byzfed.v1.Federation/PushUpdate")
        while not stop.is_set() and left() > 0:
            call = push()  # no message at all: the server never sees a header or a token
            stats["streams_opened"] += 1
            stats["streams_open"] += 1
            stats["streams_open_max"] = max(stats["streams_open_max"], stats["streams_open"])
            try:
                await asyncio.wait_for(call, timeout=max(0.1, left()))
                stats["stream_ends"]["OK"] += 1
            except asyncio.TimeoutError:
                call.cancel()
                stats["stream_ends"]["held to the end"] += 1
            except grpc.RpcError as e:
                stats["stream_ends"][e.code().name] += 1
            finally:
                stats["streams_open"] -= 1
            await asyncio.sleep(0.05)

    tasks = [loop.create_task(idle_stream(i)) for i in range(streams)]

    session = None
    if polls > 0:
        join = chans[0].unary_unary("/byzfed.v1.Federation/Join", request_serializer=pb.JoinRequest.SerializeToString,
                                    response_deserializer=pb.JoinReply.FromString)
        version = 2 if "upload_nonce" in pb.TaskHeader.DESCRIPTOR.fields_by_name else 1
        for _ in range(600):
            try:
                reply = await join(pb.JoinRequest(credentials=pb.Credentials(
                    node_name=name, node_secret="hostile-secret", federation_token=token), num_samples=10,
                    protocol_version=version), timeout=5.0)
                session = pb.Session(node_id=reply.node_id, session_token=reply.session_token)
                break
            except grpc.RpcError:
                await asyncio.sleep(0.1)
    if session is not None:
        from proto.layout import Layout
        layout = Layout.from_json(reply.layout_json)
        zeros = memoryview(np.zeros(layout.d, dtype="<f4")).cast("B")
        uploaded: set[int] = set()
        beat = chans[0].unary_unary("/byzfed.v1.Federation/Heartbeat",
                                    request_serializer=pb.HeartbeatRequest.SerializeToString,
                                    response_deserializer=pb.HeartbeatReply.FromString)
        get_task = chans[1 % channels].unary_stream("/byzfed.v1.Federation/GetTask",
                                                     request_serializer=pb.GetTaskRequest.SerializeToString,
                                                     response_deserializer=pb.TaskChunk.FromString)
        push_up = chans[2 % channels].stream_unary("/byzfed.v1.Federation/PushUpdate",
                                                    request_serializer=pb.UpdateChunk.SerializeToString,
                                                    response_deserializer=pb.PushUpdateReply.FromString)

        async def heartbeats() -> None:  # keep the hostile member's lease (its heartbeats are not measured)
            while not stop.is_set() and left() > 0:
                try:
                    await beat(pb.HeartbeatRequest(session=session), timeout=5.0)
                except grpc.RpcError:
                    pass
                await asyncio.sleep(0.5)

        async def upload(h) -> None:
            header = pb.UpdateHeader(session=session, round=h.round, model_version=h.model_version,
                                     layout_hash=reply.layout_hash, num_samples=10,
                                     tensor=codec.tensor_header(zeros, (layout.d,)))
            if "upload_nonce" in pb.UpdateHeader.DESCRIPTOR.fields_by_name:
                header.upload_nonce = h.upload_nonce

            async def msgs():
                yield pb.UpdateChunk(header=header)
                for c in codec.iter_chunks(zeros):
                    yield pb.UpdateChunk(data=c)
            try:
                await push_up(msgs(), timeout=30.0)
                stats["uploads"]["OK"] += 1
            except grpc.RpcError as e:
                stats["uploads"][e.code().name] += 1

        async def long_poll() -> None:
            while not stop.is_set() and left() > 0:
                call = get_task(pb.GetTaskRequest(session=session, wait_seconds=20.0), timeout=max(0.5, left()))
                stats["polls_opened"] += 1
                try:
                    first = await call.read()
                    if first is not grpc.aio.EOF and first.header.kind == pb.TaskHeader.TRAIN \
                            and first.header.round not in uploaded:
                        # the one poll per round it takes part with: read to its end, upload a zero update
                        uploaded.add(first.header.round)
                        loop.create_task(upload(first.header))
                        while await call.read() is not grpc.aio.EOF:
                            pass
                        code = await call.code()
                    else:  # never read the rest: hold it until the server ends (or cuts) it, for at most HOLD s
                        code = await asyncio.wait_for(call.code(), max(0.1, min(HOLD, left())))
                    stats["poll_ends"][code.name] += 1
                except asyncio.TimeoutError:
                    call.cancel()
                    stats["poll_ends"]["held, then cancelled"] += 1
                except grpc.RpcError as e:
                    stats["poll_ends"][e.code().name] += 1
                await asyncio.sleep(0.5)

        tasks.append(loop.create_task(heartbeats()))
        tasks += [loop.create_task(long_poll()) for _ in range(polls)]

    async def sampler() -> None:
        t0 = time.monotonic()
        while not stop.is_set() and left() > 0:
            stats["samples"].append((round(time.monotonic() - t0, 1), stats["streams_open"]))
            await asyncio.sleep(1.0)

    tasks.append(loop.create_task(sampler()))
    try:
        await asyncio.wait_for(stop.wait(), max(0.1, left()))
    except asyncio.TimeoutError:
        pass
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in chans:
        await ch.close(grace=None)
    Path(out).write_text(json.dumps({k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}))
    return 0


# --------------------------------------------------------------------------- spawning them

def spawn(role: str, address: str, token: str, out: Path, seconds: float, **kw: Any) -> subprocess.Popen:
    """Start ``python hostile.py ROLE ...`` (stopped by PID by :func:`stop`)."""
    argv = [sys.executable, str(SCRIPT), role, "--address", address, "--token", token, "--out", str(out),
            "--seconds", str(seconds)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=os.getcwd())


def stop(proc: subprocess.Popen, out: Path, timeout: float = 20.0) -> dict:
    """SIGTERM ``proc`` (by PID), wait for its JSON, SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return json.loads(out.read_text()) if out.exists() else {}


# --------------------------------------------------------------------------- the benchmark

def federation_scenario(rounds: int, hostile: bool):
    from tests.integration.harness import scenario

    roles = [{"name": "honest", "count": HONEST}, {"name": "probe", "count": 1}]
    if hostile:
        roles.append({"name": "hostile", "count": 1})
    return scenario(federation={"rounds": rounds, "round_timeout": 60.0, "lease_seconds": 3.0},
                    defense={"name": "mean"}, adversary={"collusion": "off"}, roles=roles)


def run_federation(run_dir: Path, rounds: int, streams: int, polls: int, budget: float = 300.0,
                   wait_open: float = 60.0) -> dict[str, Any]:
    """One federation run (hostile load iff ``streams`` or ``polls``); its figures."""
    from tests.integration.harness import Federation

    hostile = bool(streams or polls)
    s = federation_scenario(rounds, hostile)
    server_stats: list[dict] = []

    def on_event(kind: str, info: dict) -> None:
        if kind == "round_open":
            stats = getattr(fed.server, "stats", None)
            server_stats.append(stats() if stats else {})

    fed = Federation(s, run_dir, spawn=[], on_event=on_event)
    procs: list[tuple[subprocess.Popen, Path]] = []
    probe_out, hostile_out = run_dir / "probe.json", run_dir / "hostile.json"
    t0 = time.monotonic()
    with fed:
        try:
            if hostile:
                procs.append((spawn("hostile", fed.address, fed.token, hostile_out, budget, streams=streams,
                                    polls=polls, name="hostile-000"), hostile_out))
                end = time.monotonic() + wait_open
                stats = getattr(fed.server, "stats", None)
                while stats and time.monotonic() < end and stats().get("unauthenticated_open", 0) < 0.95 * streams:
                    time.sleep(0.2)
                if stats is None:  # (an older server counts nothing: give the streams time to open)
                    time.sleep(5.0)
            procs.append((spawn("probe", fed.address, fed.token, probe_out, budget, name="probe-000"), probe_out))
            for name in [n for n, _ in s.node_roles() if n.startswith("honest")]:
                fed.start_node(name)
            try:
                fed.wait(timeout=max(10.0, budget - (time.monotonic() - t0)))
                finished = True
            except AssertionError:  # the run did not finish within the budget (the old threaded server)
                finished = False
        finally:
            results = {out.name: stop(p, out) for p, out in reversed(procs)}
    wall = time.monotonic() - t0
    rows = fed.rows()
    probe = results.get("probe.json", {})
    lat = [x for _, x in probe.get("latencies", [])]
    hs = results.get("hostile.json", {})
    return {
        "hostile": hostile, "finished": finished, "rounds": len(rows), "rounds_complete": sum(r.get("outcome") == "complete" for r in rows),
        "outcomes": [r.get("outcome") for r in rows], "reported": [r.get("reported") for r in rows],
        "evicted": sorted({n for r in rows for n in r.get("evicted", [])}),
        "t_collect": [r.get("t_collect") for r in rows],
        "heartbeats": len(lat), "heartbeat_failures": probe.get("failures", {}),
        "heartbeat_p50_ms": round(1000 * percentile(lat, 0.5), 2), "heartbeat_p99_ms": round(1000 * percentile(lat, 0.99), 2),
        "heartbeat_max_ms": round(1000 * max(lat), 2) if lat else None,
        "server_at_round_open": server_stats,
        "hostile_streams_open_min_during_rounds": min((x.get("unauthenticated_open", 0) for x in server_stats),
                                                      default=None) if hostile else 0,
        "hostile_client": {k: hs.get(k) for k in ("streams_opened", "streams_open_max", "stream_ends",
                                                   "polls_opened", "poll_ends", "uploads")} if hostile else {},
        "wall_seconds": round(wall, 1),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    for role in ("probe", "hostile"):
        sp = sub.add_parser(role)
        sp.add_argument("--address", required=True)
        sp.add_argument("--token", required=True)
        sp.add_argument("--out", required=True)
        sp.add_argument("--seconds", type=float, default=120.0)
        sp.add_argument("--name", default=f"{role}-000")
        if role == "hostile":
            sp.add_argument("--streams", type=int, default=1000)
            sp.add_argument("--polls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--polls", type=int, default=50)
    p.add_argument("--budget", type=float, default=300.0, help="seconds each federation run may take")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.cmd == "probe":
        return probe_main(args.address, args.name, args.token, args.seconds, args.out)
    if args.cmd == "hostile":
        return hostile_main(args.address, args.name, args.token, args.streams, args.polls, args.seconds, args.out)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, streams, polls in (("baseline", 0, 0), ("hostile", args.streams, args.polls)):
            res = run_federation(Path(tmp) / label, args.rounds, streams, polls, budget=args.budget)
            out[label] = res
            rep = sorted(set(res["reported"]))
            print(f"{label:9s}: {'' if res['finished'] else 'DID NOT FINISH in the budget; '}"
                  f"rounds complete {res['rounds_complete']}/{res['rounds']} (reported per round: "
                  f"{'-'.join(map(str, rep[::max(1, len(rep) - 1)])) or 'none'}), evicted {res['evicted'] or 'none'}; "
                  f"probe heartbeats {res['heartbeats']}: p50 {res['heartbeat_p50_ms']} ms, "
                  f"p99 {res['heartbeat_p99_ms']} ms, max {res['heartbeat_max_ms']} ms, "
                  f"failures {res['heartbeat_failures'] or 'none'}; {res['wall_seconds']} s", flush=True)
            if streams or polls:
                hc = res["hostile_client"]
                opens = [x.get("unauthenticated_open") for x in res["server_at_round_open"] if x]
                print(f"           hostile: headerless upload streams open at the rounds' starts "
                      f"{f'{min(opens)}-{max(opens)}' if opens else '(not counted by this server)'} "
                      f"(client: opened {hc.get('streams_opened')}, at most {hc.get('streams_open_max')} at once, "
                      f"ends {hc.get('stream_ends')}); long-polls opened {hc.get('polls_opened')}, "
                      f"ends {hc.get('poll_ends')}; hostile uploads {hc.get('uploads')}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
