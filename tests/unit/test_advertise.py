"""Addresses the orchestrator hands out (ingest, collusion service, adversary view) are
reachable from the nodes: never a wildcard bind address (``federation.advertise_host``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fednode.byzantine import Behaviour, BehaviourSpec
from fednode.client import is_relative, resolve_address
from orchestrator.adversary import ByzantineSupport
from orchestrator.scenario import ScenarioError, from_dict
from orchestrator.addresses import advertised_address, is_wildcard


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "*", "0:0:0:0:0:0:0:0"])
def test_wildcards(host):
    assert is_wildcard(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.213.4.1", "::1", "fd00::1", "orchestrator.lan", "localhost"])
def test_not_wildcards(host):
    assert not is_wildcard(host)


@pytest.mark.parametrize("bind, advertise, want", [
    ("0.0.0.0", "", ""),  # nodes keep the address they joined on
    ("::", "", ""),
    ("0.0.0.0", "10.213.4.1", "10.213.4.1:50051"),
    ("0.0.0.0", "orchestrator.lan", "orchestrator.lan:50051"),
    ("::", "fd00::1", "[fd00::1]:50051"),
    ("127.0.0.1", "", "127.0.0.1:50051"),  # a concrete bind address is advertised as is
    ("10.213.4.1", "", "10.213.4.1:50051"),
    ("127.0.0.1", "10.213.4.1", "10.213.4.1:50051"),
])
def test_advertised_address(bind, advertise, want):
    assert advertised_address(bind, 50051, advertise) == want


def _scenario(**federation):
    return from_dict({"federation": federation, "roles": [{"name": "honest", "count": 2}]})


def test_scenario_advertise_host_is_checked():
    assert _scenario().federation.advertise_host == ""
    assert _scenario(host="0.0.0.0", advertise_host="10.213.4.1").federation.advertise_host == "10.213.4.1"
    assert _scenario(advertise_host="fd00::1").federation.advertise_host == "fd00::1"
    for bad in ("0.0.0.0", "::", "[::]"):
        with pytest.raises(ScenarioError, match="federation.advertise_host.*wildcard"):
            _scenario(advertise_host=bad)
    for bad in ("10.213.4.1:50051", " orch", "orch:"):
        with pytest.raises(ScenarioError, match="federation.advertise_host.*without a port"):
            _scenario(advertise_host=bad)


def test_node_side_resolution():
    assert resolve_address("", "10.213.4.1:50051") == "10.213.4.1:50051"
    assert resolve_address(":39000", "10.213.4.1:50051") == "10.213.4.1:39000"
    assert resolve_address("0.0.0.0:39000", "10.213.4.1:50051") == "10.213.4.1:39000"
    assert resolve_address("10.0.0.2:39000", "10.213.4.1:50051") == "10.0.0.2:39000"
    assert is_relative("") and is_relative(":39000") and is_relative("0.0.0.0:39000")
    assert not is_relative("10.0.0.2:39000")


def _byzantine_scenario(**federation):
    return from_dict({"federation": federation, "adversary": {"collusion": "on"},
                      "roles": [{"name": "honest", "count": 2},
                                {"name": "alie", "count": 2, "byzantine": True, "attack": "alie"}]})


@pytest.mark.parametrize("bind, advertise, want", [
    ("0.0.0.0", "", ":{port}"),  # the host of the node's orchestrator address, this port
    ("0.0.0.0", "10.213.4.1", "10.213.4.1:{port}"),
    ("127.0.0.1", "", "127.0.0.1:{port}"),
])
def test_collusion_address_handed_to_nodes(bind, advertise, want):
    s = _byzantine_scenario(host=bind, advertise_host=advertise)
    coord = SimpleNamespace(ingest_address="", adversary_view=None)
    support = ByzantineSupport(s, coord)
    try:
        port = int(support.collusion.address.rsplit(":", 1)[1])
        extra = support.behaviour_extra("alie-000", s.roles[1])
        assert extra["collusion"]["address"] == want.format(port=port)
        assert not extra["collusion"]["address"].startswith("0.0.0.0")
    finally:
        support.stop()


def test_behaviour_dials_relative_services_on_its_orchestrator_host():
    """'' (view) and ':PORT' (collusion) mean the host the node joined the orchestrator on."""
    spec = BehaviourSpec(byzantine=True, attack="ipm", knowledge="omniscient", role="ipm",
                         adversary={"address": "", "token": "t" * 32, "timeout": 1.0},
                         collusion={"address": ":39001", "token": "c" * 32, "timeout": 1.0})
    b = Behaviour(spec, "ipm-000")
    assert b.view is None  # not known yet: connected at the first round (run_round passes node.client.address)
    b.connect("10.213.4.1:50051")
    try:
        assert b.view is not None and b.collusion is None  # ipm with omniscient knowledge does not collude
        b2 = Behaviour(BehaviourSpec(byzantine=True, attack="alie", role="alie",
                                     collusion={"address": ":39001", "token": "c" * 32}), "alie-000",
                       orchestrator="10.213.4.1:50051")
        assert b2.collusion is not None and b2.collusion.address == "10.213.4.1:39001"
        b2.close()
    finally:
        b.close()


def test_omniscient_node_without_a_view_still_refuses_to_start():
    from fednode.byzantine import BehaviourError
    with pytest.raises(BehaviourError, match="needs the adversary view"):
        Behaviour(BehaviourSpec(byzantine=True, attack="ipm", knowledge="omniscient"), "ipm-000")
    with pytest.raises(BehaviourError, match="needs the adversary view"):
        Behaviour(BehaviourSpec(byzantine=True, attack="ipm", knowledge="omniscient",
                                adversary={"address": "", "token": ""}), "ipm-000")
