"""The aggregation ranks under the run's security (``orchestrator/ranksec.py``), for real:
W = 2 federations on 127.0.0.1 (rank 0 in this process, rank 1 a ``python -m
orchestrator rank`` child, nodes their own processes) on a real gloo group, and bare
groups of real processes joining rank 0's real store.

- sealed collectives (``security.rank_encryption``) end on the very model the unsealed
  group ends on, bit for bit; a capture of the loopback interface (AF_PACKET, root)
  during both runs shows the run's session key in neither (it always crosses sealed),
  and rank 1's zero-padded address table in the unsealed run only;
- the group secret reaches rank 1 through its environment, never its argv, logs or
  outputs;
- a stranger process holding a wrong group key cannot take a rank: its join fails with
  a clear error, the leader logs the refusal, and the real rank then joins and the
  group's sealed collectives (broadcast, row gather, the defenses' Gram partials) carry
  the right values; a frame sealed under another key fails the collective on both ranks
  with a ``SealError`` naming the sender.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator import checkpoint, group as group_module, ranksec
from tests.integration.harness import run, scenario

ROOT = Path(__file__).resolve().parents[2]
ROLES = [{"name": "honest", "count": 5}]


def _scenario(encrypt: bool):
    return scenario(aggregation={"ranks": 2, "timeout_seconds": 30.0},
                    federation={"rounds": 3, "round_timeout": 30.0, "lease_seconds": 3.0},
                    defense={"name": "median"}, roles=ROLES, security={"rank_encryption": encrypt})


class LoopbackCapture:
    """Every TCP payload on ``lo`` while it runs (AF_PACKET; root), reassembled per flow
    by sequence number. Bounded: the first ``per_flow`` bytes of each flow (what the
    test looks for crosses when a group forms, and other sessions' bulk transfers on
    this machine cannot crowd it out), at most ``max_bytes`` in all, ``seconds`` long."""

    def __init__(self, max_bytes: int = 1 << 30, per_flow: int = 8 << 20, seconds: float = 300.0) -> None:
        self.per_flow = per_flow
        self._first: dict[tuple, int] = {}
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind(("lo", 0))
        except (PermissionError, OSError, AttributeError) as e:
            pytest.skip(f"cannot capture on lo (AF_PACKET needs root on Linux): {e}")
        self.sock.settimeout(0.2)
        self.max_bytes, self.end = max_bytes, time.monotonic() + seconds
        self.flows: dict[tuple, dict[int, bytes]] = {}
        self.kept = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.end and self.kept < self.max_bytes:
            try:
                pkt, addr = self.sock.recvfrom(1 << 17)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING:  # (lo shows each packet twice: keep the incoming copy)
                continue
            if len(pkt) < 14 + 20 or pkt[12:14] != b"\x08\x00" or pkt[14] >> 4 != 4 or pkt[23] != 6:
                continue  # IPv4 TCP only
            ihl = (pkt[14] & 0xF) * 4
            tcp = 14 + ihl
            sport, dport, seq = struct.unpack("!HHI", pkt[tcp:tcp + 8])
            off = (pkt[tcp + 12] >> 4) * 4
            total = struct.unpack("!H", pkt[16:18])[0]
            payload = pkt[tcp + off:14 + total]
            if payload:
                flow = (pkt[26:30], sport, pkt[30:34], dport)
                first = self._first.setdefault(flow, seq)
                if (seq - first) % (1 << 32) < self.per_flow:
                    self.flows.setdefault(flow, {})[seq] = payload
                    self.kept += len(payload)

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return [b"".join(p for _, p in sorted(segs.items(), key=lambda kv: (kv[0] - self._first[flow]) % (1 << 32)))
                for flow, segs in self.flows.items()]


def _final_weights(run_dir: Path) -> torch.Tensor:
    return checkpoint.load(run_dir / "checkpoint.pt")["global"]


def test_sealed_collectives_end_on_the_unsealed_model_and_nothing_crosses_in_the_clear(tmp_path, monkeypatch, caplog):
    made_keys: list[bytes] = []
    session_keys: list[bytes] = []
    real_new, real_form = ranksec.new_group_key, group_module.form

    def spy_new():  # (the real key, recorded to look for it afterwards)
        made_keys.append(real_new())
        return made_keys[-1]

    def spy_form(*args, **kwargs):
        out = real_form(*args, **kwargs)
        session_keys.append(out[1].key)
        return out

    monkeypatch.setattr(group_module, "new_group_key", spy_new)
    monkeypatch.setattr(group_module, "form", spy_form)
    caplog.set_level("INFO", logger="orchestrator.group")
    streams, dirs = {}, {}
    for encrypt in (False, True):
        dirs[encrypt] = tmp_path / ("sealed" if encrypt else "plain")
        cap = LoopbackCapture()
        try:
            _, rows = run(_scenario(encrypt), dirs[encrypt])
        finally:
            streams[encrypt] = cap.stop()
        assert [r["outcome"] for r in rows] == ["complete"] * 3
        assert [r["reported"] for r in rows] == [5] * 3
    # encryption changes no number: the same model, bit for bit
    assert torch.equal(_final_weights(dirs[False]), _final_weights(dirs[True]))
    assert "collectives not sealed" in caplog.text and "collectives sealed (AES-GCM)" in caplog.text
    assert len(made_keys) == 2 and len(session_keys) == 2
    for encrypt, run_dir in dirs.items():
        wire = streams[encrypt]
        assert sum(map(len, wire)) > 100_000, "the capture saw (almost) nothing"
        assert any(b"auth0/challenge" in s for s in wire), "the capture missed the group's store traffic"
        # the session key always crosses sealed
        key = session_keys[list(dirs).index(encrypt)]
        assert not any(key in s for s in wire), f"the run's session key crossed in the clear (encrypt={encrypt})"
        # the group secret is in neither the wire, rank 1's argv-derived files, logs nor outputs
        secret = made_keys[list(dirs).index(encrypt)]
        assert not any(secret in s or secret.hex().encode() in s for s in wire)
        for path in run_dir.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert secret.hex().encode() not in data and secret not in data, f"group key in {path}"
        # rank 1's ingest address, zero-padded in the group's address table: plain only
        rank1 = (run_dir / "ranks" / "rank-1.log").read_text()
        address = rank1.split("ingest endpoint ")[1].split()[0].encode()
        table_row = address + b"\0" * 64
        seen = any(table_row in s for s in wire)
        assert seen != encrypt, f"rank 1's address row {'crossed in the clear' if seen else 'never seen'} " \
                                f"(encrypt={encrypt})"


@pytest.mark.slow  # ~60-80 s under load: ./launch.sh test -m slow tests/integration/test_group_security.py
def test_a_sealed_group_re_forms_after_a_rank_dies(tmp_path):
    """W = 3, sealed: rank 2 SIGKILLed mid-run; the survivors prove the group secret
    again (generation 1: new challenge, new keys) and the later rounds complete."""
    import signal

    run_dir = tmp_path / "run"
    s = scenario(aggregation={"ranks": 3, "timeout_seconds": 30.0},
                 federation={"rounds": 5, "round_timeout": 30.0, "lease_seconds": 3.0},
                 defense={"name": "median"}, roles=ROLES, security={"rank_encryption": True})
    pid_file = run_dir / "ranks" / "rank-2.pid"
    killed: list[int] = []

    def kill_rank_2() -> None:
        end = time.monotonic() + 200
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < end:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 and pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    threading.Thread(target=kill_rank_2, daemon=True).start()
    summary, rows = run(s, run_dir)
    assert killed, "rank 2 was never killed"
    failed = [r for r in rows if "group" in r]
    assert len(failed) == 1 and failed[0]["group"]["generation"] == 1, [r["outcome"] for r in rows]
    after = rows[rows.index(failed[0]) + 1:]
    assert after and all(r["outcome"] == "complete" for r in after)
    assert summary["rounds_completed"] == 4
    assert "after the group re-formed (generation 1)" in (run_dir / "ranks" / "rank-1.log").read_text()


# ----------------------------------------------------------------------------- a stranger

def _member(rank: int, rendezvous: str, out: str, encrypt: bool) -> None:
    """One process of a bare W = 2 group (run by the test below as ``python -c``): form
    the group with the key in its environment, then a sealed broadcast and row gather."""
    import logging

    logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(levelname)s %(message)s")
    spec = group_module.GroupSpec(rank, 2, rendezvous)
    device = torch.device("cpu")
    try:
        group, keys, roster = group_module.form(spec, device, 20.0, encrypt=encrypt)
    except group_module.GroupError as e:
        print(f"JOIN FAILED: {e}", flush=True)
        sys.exit(3)
    model = torch.arange(1000, dtype=torch.float32) * (1.5 if rank == 0 else 0.0)
    group.broadcast_(model)
    rows, sizes = group.gather_rows(torch.full((rank + 1, 300), float(rank + 1)))
    # the defenses' split work (shards.DistShards): Gram partials summed across the ranks, sealed
    from orchestrator.collective import AggregationGroup
    from orchestrator.defenses._geometry import frame
    from orchestrator.defenses._split import split_frame
    from orchestrator.shards import DistShards
    x = torch.randn(6, 4000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    split = split_frame(x, DistShards(group.group, min_columns=1), centre=False)
    gram_error = float((split.g - frame(x, centre=False).g).abs().max() / frame(x, centre=False).g.abs().max())
    # a payload sealed under another key (a tampered frame): the collective fails on both ranks
    tampered = ""
    if rank == 1:
        bad = ranksec.GroupSecret(ranksec.new_group_key()).sealer(group.sealer.generation, b"t" * 32, 1)
        bad._op = group.sealer._op
        group.adopt(AggregationGroup(group.group, bad, encrypt=True))
    try:
        group.gather_rows(torch.ones(1, 10))
    except ranksec.SealError as e:
        tampered = str(e)
    Path(out).write_text(json.dumps({"key": keys.key.hex(), "model_sum": float(model.sum()), "sizes": sizes,
                                     "rows": [float(v) for v in rows[:, 0]], "sealing": group.sealing,
                                     "refused": roster.refused, "gram_error": gram_error, "tampered": tampered}))
    roster.stop()
    group.close()


def _start(rank: int, rendezvous: str, out: Path, key: bytes, log: Path) -> subprocess.Popen:
    code = (f"from tests.integration.test_group_security import _member; "
            f"_member({rank}, {rendezvous!r}, {str(out)!r}, True)")
    env = {**os.environ, "BYZFED_GROUP_KEY": key.hex(), "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def test_a_stranger_with_a_wrong_group_key_cannot_take_a_rank(tmp_path):
    key, wrong = ranksec.new_group_key(), ranksec.new_group_key()
    rendezvous = f"tcp://127.0.0.1:{group_module.free_port()}"
    procs: list[subprocess.Popen] = []
    try:
        leader = _start(0, rendezvous, tmp_path / "r0.json", key, tmp_path / "r0.log")
        procs.append(leader)
        stranger = _start(1, rendezvous, tmp_path / "stranger.json", wrong, tmp_path / "stranger.log")
        procs.append(stranger)
        assert stranger.wait(timeout=60) == 3, (tmp_path / "stranger.log").read_text()
        text = (tmp_path / "stranger.log").read_text()
        assert "JOIN FAILED" in text and "does not verify under this rank's group key" in text, text
        assert not (tmp_path / "stranger.json").exists()
        assert leader.poll() is None, (tmp_path / "r0.log").read_text()  # the leader still waits for rank 1
        real = _start(1, rendezvous, tmp_path / "r1.json", key, tmp_path / "r1.log")
        procs.append(real)
        assert real.wait(timeout=60) == 0, (tmp_path / "r1.log").read_text()
        assert leader.wait(timeout=30) == 0, (tmp_path / "r0.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    log0 = (tmp_path / "r0.log").read_text()
    assert "refused a join as aggregation rank 1 (generation 0)" in log0, log0
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert len(r0["refused"]) == 1 and r0["refused"][0]["rank"] == 1
    assert r0["key"] == r1["key"]  # the session key reached rank 1 (sealed), the same on both
    assert r0["sealing"] and r1["sealing"]
    assert r1["model_sum"] == r0["model_sum"] == 1.5 * 999 * 1000 / 2
    assert r0["sizes"] == r1["sizes"] == [1, 2] and r0["rows"] == r1["rows"] == [1.0, 2.0, 2.0]
    assert r0["gram_error"] < 1e-9 and r1["gram_error"] < 1e-9
    assert "payload from rank 1" in r0["tampered"] and "does not authenticate" in r0["tampered"], r0["tampered"]
    assert "payload from rank 0" in r1["tampered"], r1["tampered"]


# ----------------------------------------------------------------------------- MPI path

@pytest.mark.slow  # ~45-60 s (an mpirun -np 3 job) under this VM's load: ./launch.sh test -m slow ...
def test_sealed_mpi_gather_equals_the_sealed_gloo_gather_and_refuses_another_key(tmp_path):
    """Under a real ``mpirun -np 3`` (shared memory; gloo on 127.0.0.1): ``MpiGather`` with
    the group's sealer and the sealed gloo gather return the same rows (uneven counts, a
    rank with none); a rank sealing under another key makes both fail on the others."""
    from tests.integration.mpi_support import MPIRUN, NO_MPI4PY

    if not MPIRUN.exists() or NO_MPI4PY:
        pytest.skip(f"needs mpirun ({MPIRUN}) and mpi4py ({NO_MPI4PY or 'ok'})")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    argv = [str(MPIRUN), "-np", "3", *root, "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,sm",
            "--mca", "pml", "ob1", "-x", "BYZFED_GROUP_KEY", sys.executable, str(Path(__file__).resolve()),
            "--mpi-worker"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "BYZFED_GROUP_KEY": ranksec.new_group_key().hex()}
    out = tmp_path / "mpirun.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()  # mpirun stops its ranks
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"mpirun -np 3 did not finish in 120 s\n{out.read_text(errors='replace')[-4000:]}")
    text = out.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    for r in range(3):
        assert f"rank {r}: sealed gathers equal" in text, text[-4000:]
    for r in (0, 1):
        assert f"rank {r}: refused rank 2's frame: MPI all-gather payload from rank 2" in text, text[-4000:]


def _mpi_worker() -> None:
    import numpy as np
    from mpi4py import MPI

    from orchestrator.collective import AggregationGroup
    from orchestrator.interfaces import free_port
    from orchestrator.mpigather import MpiGather

    counts, d = (2, 0, 3), 129
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    port = np.array([free_port("127.0.0.1") if rank == 0 else 0], dtype=np.int64)
    comm.Bcast(port, root=0)
    secret = ranksec.GroupSecret(ranksec.group_key_from())  # from the environment, as mpirun -x passed it
    sealer = secret.sealer(0, b"m" * 32, rank)
    bare = AggregationGroup.init(rank, world, f"tcp://127.0.0.1:{int(port[0])}", torch.device("cpu"), timeout_s=30)
    group = AggregationGroup(bare.group, sealer, encrypt=True)
    mpi = MpiGather(comm, sealer=sealer)
    try:
        def rows_of(r, c):
            return torch.arange(c * d, dtype=torch.float32).reshape(c, d) + 1000.0 * (r + 1)

        expected = torch.cat([rows_of(r, c) for r, c in enumerate(counts)])
        full_mpi, sizes_mpi = mpi.gather_rows(rows_of(rank, counts[rank]))
        full_gloo, sizes_gloo = group.gather_rows(rows_of(rank, counts[rank]))
        assert sizes_mpi == sizes_gloo == list(counts), (sizes_mpi, sizes_gloo)
        assert torch.equal(full_mpi, expected) and torch.equal(full_gloo, expected)
        print(f"rank {rank}: sealed gathers equal (counts {list(counts)}, {sealer._op} sealed ops)", flush=True)
        if rank == 2:  # seals under another key from here on
            mpi.sealer = ranksec.GroupSecret(ranksec.new_group_key()).sealer(0, b"m" * 32, 2)
            mpi.sealer._op = sealer._op
        try:
            mpi.gather_rows(rows_of(rank, 1))
            print(f"rank {rank}: the gather went through", flush=True)
        except ranksec.SealError as e:
            print(f"rank {rank}: refused rank 2's frame: {e}" if rank != 2 else f"rank 2: refused: {e}", flush=True)
    finally:
        mpi.close()
        group.close()
        bare.close()


if __name__ == "__main__" and "--mpi-worker" in sys.argv:
    _mpi_worker()
