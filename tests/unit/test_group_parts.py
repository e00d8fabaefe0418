"""Logic of the aggregation group without the collectives: session identities any rank
can verify, node-to-rank assignment, the leader's mirrored ledger, an ingest rank's
session check, and the control tables' text codec. (The collectives themselves are
exercised on real gloo groups in tests/integration/test_group.py.)"""
from __future__ import annotations

import pytest
import torch

from orchestrator.errors import Refusal
from orchestrator.group import Assignment, RankMembership, decode_text, encode_text, report_rows
from orchestrator.identity import SessionKeys, index_of
from orchestrator.membership import Membership
from orchestrator.rounds import RoundKeeper, Upload


def test_session_keys_are_shared_and_unforgeable():
    a = SessionKeys()
    b = SessionKeys(a.key)  # another rank, given the run's key
    node = a.node_id(7, "honest-007")
    assert node == b.node_id(7, "honest-007") and index_of(node) == 7
    assert b.check_token(node, a.token(node))
    assert a.nonce(3, 2, node) == b.nonce(3, 2, node) != a.nonce(4, 2, node)
    other = SessionKeys()
    assert not other.check_token(node, a.token(node))  # another run's key
    assert not a.check_token(a.node_id(8, "honest-008"), a.token(node))  # one node's token for another
    assert not a.check_token("n0007-zzzzzz", a.token(node))
    assert index_of("not-an-id") == -1
    with pytest.raises(ValueError):
        SessionKeys(b"short")


def test_membership_hands_out_derived_ids_and_tokens():
    keys = SessionKeys()
    roster = {"a": 0, "b": 1}
    m = Membership("fed", 5.0, keys=keys, index_of=roster.__getitem__)
    member, rejoined = m.join("b", "s", "fed", 10, 0)
    assert member.node_id == keys.node_id(1, "b") and member.token == keys.token(member.node_id) and not rejoined
    again, rejoined = m.join("b", "s", "fed", 10, 1)
    assert again.token == member.token and rejoined
    m.force_rejoin([member.node_id])
    with pytest.raises(Refusal) as e:
        m.heartbeat(member.node_id, member.token)
    assert e.value.reason == "not_found"
    assert ("evict", member.node_id) in m.drain_events()


def test_assignment_balances_keeps_and_moves():
    a = Assignment(3)
    ranks = [a.rank_of(f"n{i}") for i in range(7)]
    assert sorted(ranks) == [0, 0, 0, 1, 1, 2, 2]
    assert a.rank_of("n0") == ranks[0]  # a re-join keeps its rank
    moved = a.remove([1])
    assert sorted(moved) == sorted(f"n{i}" for i, r in enumerate(ranks) if r == 1)
    assert all(a.rank_of(n) in (0, 2) for n in moved)


def test_rank_membership_verifies_without_state():
    keys = SessionKeys()
    names = {0: "a", 1: "b"}
    rm = RankMembership(keys, names, 5.0, rank=1)
    node = keys.node_id(1, "b")
    assert rm.authenticate(node, keys.token(node)).name == "b"
    with pytest.raises(Refusal) as e:
        rm.authenticate(node, "0" * 32)
    assert e.value.reason == "unauthenticated"
    with pytest.raises(Refusal) as e:
        rm.authenticate(keys.node_id(5, "x"), keys.token(keys.node_id(5, "x")))  # not in the roster
    assert e.value.reason == "unauthenticated"
    for call in (lambda: rm.join("b", "s", "t", 1, 0), lambda: rm.heartbeat(node, keys.token(node))):
        with pytest.raises(Refusal) as e:
            call()
        assert e.value.reason == "wrong_endpoint" and "rank 1" in e.value.message


def test_leader_ledger_mirrors_other_ranks():
    keys = SessionKeys()
    k = RoundKeeper(nonce_fn=keys.nonce)
    ids = [keys.node_id(i, f"x{i}") for i in range(3)]
    r = k.open(0, 0, set(ids), 30.0, 1.0)
    assert r.nonce_of(ids[0]) == keys.nonce(0, 0, ids[0])
    k.mirror(0, ids[0], "in_flight")
    assert ids[0] in r.in_flight
    k.mirror(0, ids[0], "done", Upload(ids[0], 5, 100, 0.1))
    k.mirror(0, ids[1], "broken")
    k.mirror(1, ids[2], "done", Upload(ids[2], 5, 100, 0.1))  # another round: ignored
    assert set(r.uploads) == {ids[0]} and ids[1] in r.broken and not r.in_flight
    k.close_now("closed by the leader")
    assert r.closed
    k.mirror(0, ids[2], "in_flight")  # after the close: ignored ...
    assert ids[2] not in r.in_flight
    k.mirror(0, ids[2], "done", Upload(ids[2], 5, 100, 0.1), after_close=True)  # ... but the sealing poll counts
    assert ids[2] in r.uploads
    rows = report_rows(r)
    assert rows.shape == (3, 5) and rows[:, 0].tolist() == [0, 1, 2] and rows[:, 1].tolist() == [2, 3, 2]
    assert report_rows(None).tolist() == [[-1, 0, 0, 0, 0]]


def test_text_codec_round_trips_and_bounds():
    t = encode_text("10.0.0.2:50051")
    assert t.dtype == torch.uint8 and decode_text(t) == "10.0.0.2:50051"
    assert decode_text(encode_text("")) == ""
    with pytest.raises(ValueError):
        encode_text("x" * 1000)


@pytest.mark.parametrize("section,key", [({"ranks": 0}, "aggregation.ranks"), ({"ranks": 65}, "aggregation.ranks"),
                                         ({"timeout_seconds": 1}, "aggregation.timeout_seconds")])
def test_scenario_checks_the_group(section, key):
    from orchestrator.scenario import ScenarioError, from_dict
    with pytest.raises(ScenarioError, match=key.replace(".", r"\.")):
        from_dict({"name": "t", "aggregation": section})


def test_several_ranks_run_synchronous_rounds_only():
    from orchestrator.scenario import ScenarioError, from_dict
    assert from_dict({"name": "t", "aggregation": {"ranks": 3}}).aggregation.ranks == 3
    with pytest.raises(ScenarioError, match="synchronous rounds only"):
        from_dict({"name": "t", "aggregation": {"ranks": 2}, "federation": {"mode": "async"}})

