import threading

import pytest
import torch

from orchestrator.errors import Refusal
from orchestrator.membership import Membership
from orchestrator.rounds import RoundKeeper, Upload, quorum_count
from orchestrator.selection import select


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_join_is_idempotent_and_guarded():
    clock = Clock()
    m = Membership("fed", lease_seconds=5, clock=clock)
    a, rejoined = m.join("a", "sa", "fed", 10, 0)
    assert not rejoined
    a2, rejoined = m.join("a", "sa", "fed", 10, 3)
    assert rejoined and a2.node_id == a.node_id and a2.token == a.token
    with pytest.raises(Refusal) as e:
        m.join("a", "other", "fed", 10, 0)
    assert e.value.reason == "unauthenticated"
    with pytest.raises(Refusal) as e:
        m.join("b", "sb", "wrong", 10, 0)
    assert e.value.reason == "unauthenticated"
    with pytest.raises(Refusal) as e:
        m.authenticate(a.node_id, "bad")
    assert e.value.reason == "unauthenticated"


def test_lease_expiry_evicts_and_heartbeat_renews():
    clock = Clock()
    m = Membership("fed", lease_seconds=5, clock=clock)
    a, _ = m.join("a", "sa", "fed", 1, 0)
    b, _ = m.join("b", "sb", "fed", 1, 0)
    clock.t = 4
    m.heartbeat(a.node_id, a.token)
    clock.t = 6
    assert [x.name for x in m.expire()] == ["b"]
    assert [x.name for x in m.alive()] == ["a"]
    with pytest.raises(Refusal) as e:
        m.heartbeat(b.node_id, b.token)
    assert e.value.reason == "not_found"
    b2, rejoined = m.join("b", "sb", "fed", 1, 2)
    assert rejoined and b2.node_id == b.node_id and b2.alive and b2.joined_round == 2
    m.leave(a.node_id, a.token)
    assert [x.name for x in m.alive()] == ["b"]


def test_quorum_count():
    assert quorum_count(0.5, 10) == 5 and quorum_count(0.51, 10) == 6 and quorum_count(1.0, 3) == 3
    assert quorum_count(4, 10) == 4 and quorum_count(40, 10) == 10 and quorum_count(0.01, 3) == 1


def _upload(node, d=3):
    return Upload(node, 1, 4 * d, 0.0)


def test_round_keeper_checks_and_closes():
    clock = Clock()
    k = RoundKeeper(clock)
    r = k.open(0, 5, {"a", "b", "c"}, timeout=10, quorum=0.5)
    assert k.task_for("a") is r and k.task_for("z") is None
    for args, reason in [(("z", 0, 5), "permission_denied"), (("a", 1, 5), "stale"), (("a", 0, 4), "stale")]:
        with pytest.raises(Refusal) as e:
            k.begin_upload(*args)
        assert e.value.reason == reason
    rr = k.begin_upload("a", 0, 5)
    with pytest.raises(Refusal) as e:
        k.begin_upload("a", 0, 5)  # concurrent second stream
    assert e.value.reason == "duplicate"
    k.finish_upload(rr, _upload("a"))
    assert k.task_for("a") is None
    with pytest.raises(Refusal) as e:
        k.begin_upload("a", 0, 5)
    assert e.value.reason == "duplicate"
    # a broken stream keeps nothing and ends the node's part in the round (one attempt per round,
    # so a node restarted after a crash does not crash on the same round again)
    rc = k.begin_upload("c", 0, 5)
    k.abort_upload(rc, "c", "broken_stream")
    assert "c" not in r.uploads and not r.in_flight and k.task_for("c") is None
    with pytest.raises(Refusal) as e:
        k.begin_upload("c", 0, 5)
    assert e.value.reason == "duplicate"
    k.finish_upload(k.begin_upload("b", 0, 5), _upload("b"))
    clock.t = 11  # deadline passed, c missing: closes with quorum 2
    closed = k.wait_close(lambda n: True)
    assert closed.outcome == "deadline" and closed.missing == {"c"}
    with pytest.raises(Refusal) as e:
        k.begin_upload("c", 0, 5)
    assert e.value.reason == "stale"


def test_round_below_quorum_is_abandoned_and_dead_nodes_close_early():
    clock = Clock()
    k = RoundKeeper(clock)
    k.open(0, 0, {"a", "b", "c", "d"}, timeout=100, quorum=0.75)
    k.finish_upload(k.begin_upload("a", 0, 0), _upload("a"))
    closed = k.wait_close(lambda n: n == "a")  # every missing node is dead: no need to wait
    assert closed.outcome.startswith("abandoned") and "quorum 3" in closed.outcome and "dead-nodes" in closed.outcome


def test_wait_close_wakes_on_last_upload():
    k = RoundKeeper()
    k.open(0, 0, {"a", "b"}, timeout=30, quorum=1.0)
    def late():
        for n in "ab":
            k.finish_upload(k.begin_upload(n, 0, 0), _upload(n))
    threading.Timer(0.2, late).start()
    closed = k.wait_close(lambda n: True)
    assert closed.outcome == "complete" and closed.closed_at - closed.opened_at < 5


def test_selection_modes():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    alive = [f"n{i}" for i in range(10)]
    assert select(alive, "all", 0, g()) == sorted(alive)
    s1 = select(alive, "sample", 3, g())
    assert len(s1) == 3 and s1 == select(list(reversed(alive)), "sample", 3, g())
    assert len(select(alive, "sample", 3, g(), over_selection=1.4)) == 5
    assert len(select(alive[:2], "sample", 3, g())) == 2
    with pytest.raises(ValueError, match="allowed"):
        select(alive, "some", 3, g())
