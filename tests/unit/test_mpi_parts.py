"""The pure parts of an ``mpirun`` job: who hosts which node, the rank from the launcher's
environment, which address other machines reach this one at. (``tests/integration/
test_mpi.py`` runs real jobs.)"""
from __future__ import annotations

import ipaddress

import pytest

from orchestrator.interfaces import pinned, reachable_address
from orchestrator.launch import share
from orchestrator.mpi import World, role_of


def test_share_is_a_balanced_deterministic_partition():
    names = [f"n{i}" for i in range(7)]
    parts = [share(names, 3, k) for k in range(3)]
    assert parts == [["n0", "n3", "n6"], ["n1", "n4"], ["n2", "n5"]]
    assert sorted(sum(parts, [])) == names
    assert share(names, 1, 0) == names and share(names[:1], 2, 1) == []
    with pytest.raises(ValueError):
        share(names, 2, 2)


def test_rank_from_open_mpi_first_then_slurm():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert World.from_env({**slurm, **ompi}) == World(3, 5, 1)  # mpirun inside an allocation
    assert World.from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2"}) == World(2, 4, 2)
    assert World.from_env({}) is None
    assert [role_of(r, 2) for r in range(4)] == ["orchestrator", "aggregation", "node-host", "node-host"]
    assert [role_of(r, 1) for r in range(3)] == ["orchestrator", "node-host", "node-host"]


MINE = [("lo", ipaddress.IPv4Interface("127.0.0.1/8")),
        ("docker0", ipaddress.IPv4Interface("172.17.0.1/16")),
        ("eth0", ipaddress.IPv4Interface("192.168.1.10/24")),
        ("eth1", ipaddress.IPv4Interface("10.213.5.1/24"))]


def test_the_pinned_subnet_or_interface_wins():
    assert reachable_address(["192.168.1.11"], MINE, ["10.213.5.0/24"]) == "10.213.5.1"
    assert reachable_address(["192.168.1.11"], MINE, ["eth1"]) == "10.213.5.1"
    assert reachable_address(["192.168.1.11"], MINE, ["10.9.9.0/24"]) == "192.168.1.10"  # pin matches nothing here


def test_the_subnet_shared_with_the_other_hosts_and_never_loopback_or_a_copy_of_ours():
    # 172.17.0.1 exists on every machine with docker: it is no evidence of a shared network
    peers = ["127.0.0.1", "172.17.0.1", "10.213.5.2", "10.213.5.3", "192.168.1.11"]
    assert reachable_address(peers, MINE, []) == "10.213.5.1"
    assert reachable_address(["127.0.0.1", "172.17.0.1", "192.168.1.12"], MINE, []) == "192.168.1.10"


def test_pins_come_from_mpiruns_mca_variables():
    env = {"OMPI_MCA_btl_tcp_if_include": "10.213.5.0/24,eth1", "PRTE_MCA_oob_tcp_if_include": "10.213.5.0/24"}
    assert pinned(env) == ["10.213.5.0/24", "eth1"]
    assert pinned({}) == []
