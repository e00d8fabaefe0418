"""A self-reported sample count never lets one node outweigh the rest (real gRPC, 127.0.0.1).

Observed before the fix: a node claiming ``num_samples = 2**62`` with a finite update of
minus the global weights took FedAvg's accuracy from 0.864 to 0.100 for the rest of the run.
"""
from __future__ import annotations

import threading

import torch

from fednode.client import FederationClient
from orchestrator.coordinator import Coordinator
from orchestrator.scenario import from_dict
from orchestrator.servicer import serve


def _federation(tmp_path, **fed):
    s = from_dict({"name": "counts", "model": {"name": "logreg"}, "defense": {"name": "fedavg"},
                   "federation": {"rounds": 1, "round_timeout": 30.0, "quorum": 1.0, "lease_seconds": 30.0, **fed},
                   "roles": [{"name": "h", "count": 2}, {"name": "liar", "count": 1}],
                   "output": {"live": False, "plot": False}})
    coord = Coordinator(s, tmp_path, "tok")
    server, port = serve(coord, "127.0.0.1", 0, 16)
    clients = {}
    for name, _ in s.node_roles():
        c = FederationClient(f"127.0.0.1:{port}")
        c.join(name, f"secret-{name}", "tok")
        clients[name] = c
    return coord, server, clients


def _one_round(coord, clients, claims):
    before = coord.model.weights.clone()
    runner = threading.Thread(target=coord.run)
    runner.start()
    for name, c in clients.items():
        t = c.get_task(wait_seconds=20.0)
        assert t.kind == "train"
        delta = -t.weights if name.startswith("liar") else torch.full_like(t.weights, 0.01)
        c.push_update(t.round, t.model_version, delta, claims[name])
    runner.join(60)
    assert not runner.is_alive()
    return before, coord.metrics.rows[-1]


def test_a_lying_count_is_capped_at_the_assigned_shard(tmp_path):
    coord, server, clients = _federation(tmp_path)
    try:
        assigned = coord.assigned_counts
        claims = {"h-000": assigned["h-000"], "h-001": assigned["h-001"], "liar-000": 2**62}
        before, row = _one_round(coord, clients, claims)
        assert row["counts_capped"] == ["liar-000"] and row["outcome"] == "complete"
        n = [assigned["h-000"], assigned["h-001"], assigned["liar-000"]]
        expected = before + (n[0] * 0.01 + n[1] * 0.01 - n[2] * before) / sum(n)
        assert torch.allclose(coord.model.weights, expected, atol=1e-6)
        # the liar's share is its shard's share, about a third, never all of it
        assert n[2] / sum(n) < 0.5
    finally:
        for c in clients.values():
            c.close()
        server.stop(0)


def test_median_mode_for_nodes_that_bring_their_own_data(tmp_path):
    coord, server, clients = _federation(tmp_path, sample_counts="median", count_cap=2.0)
    try:
        claims = {"h-000": 100, "h-001": 300, "liar-000": 2**62}
        before, row = _one_round(coord, clients, claims)
        assert row["counts_capped"] == ["liar-000"]
        n = [100, 300, 600]  # the liar is cut to 2 x the median claim (300)
        expected = before + (n[0] * 0.01 + n[1] * 0.01 - n[2] * before) / sum(n)
        assert torch.allclose(coord.model.weights, expected, atol=1e-6)
    finally:
        for c in clients.values():
            c.close()
        server.stop(0)
