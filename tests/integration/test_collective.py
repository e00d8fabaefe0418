"""The aggregation group's all-gather on a real gloo process group (3 processes)."""
import os
import socket

import torch
import torch.multiprocessing as mp

from orchestrator.collective import AggregationGroup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    group = AggregationGroup.init(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
    try:
        # rank r ingested r + 1 rows (uneven on purpose), each row tagged with (rank, index)
        rows = torch.stack([torch.full((5,), 10.0 * rank + i) for i in range(rank + 1)])
        full, sizes = group.gather_rows(rows)
        torch.save({"full": full, "sizes": sizes}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        group.close()


def test_gather_rows_over_gloo(tmp_path):
    world = 3
    mp.start_processes(_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    expected = torch.stack([torch.full((5,), 10.0 * r + i) for r in range(world) for i in range(r + 1)])
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        assert got["sizes"] == [1, 2, 3]
        assert torch.equal(got["full"], expected)


def test_single_rank_has_no_group():
    g = AggregationGroup.init(0, 1, "unused", torch.device("cpu"))
    rows = torch.randn(4, 3)
    full, sizes = g.gather_rows(rows)
    assert full is rows and sizes == [4] and g.world_size == 1
