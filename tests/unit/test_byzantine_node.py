"""The Byzantine node's behaviour, the collusion service and the adversary view,
in one process (real gRPC on 127.0.0.1 where a service is involved)."""
from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
import torch

from attacks import AttackContext, build_attack
from attacks.collusion import (CollusionClient, CollusionError, CollusionServer, assemble, data_frames,
                               header_frame, parse_header, tensor_payload)
from attacks.statistical import alie_default_z
from fednode.byzantine import AdversaryViewClient, Behaviour, BehaviourError, BehaviourSpec, derive_seed
from fednode.client import Task
from proto import codec
from proto.layout import Layout

D = 12
TOKEN = "t" * 32


def behaviour(**spec) -> Behaviour:
    return Behaviour(BehaviourSpec(**{"byzantine": True, "seed": 3, "role": "byz", **spec}), "byz-000")


def task(round_id: int = 0, n: int = 10) -> Task:
    return Task("train", round_id, 7, time.time() + 30, {"seed": 0, "round": round_id, "num_selected": n, "epochs": 1},
                torch.linspace(-1, 1, D))


class FakeNode:
    """What Behaviour uses of a Node: train, upload, _load_work and the session."""

    def __init__(self, seed: int = 0) -> None:
        self.benign = torch.randn(D, generator=torch.Generator().manual_seed(seed)) + 0.5
        self.x, self.y = torch.randn(20, 4), torch.arange(20) % 5
        self.trained_on: list = []
        self.uploads: list[tuple[torch.Tensor, int, dict]] = []
        layout = Layout.from_shapes([("w", (8,)), ("b", (4,))])
        self.client = SimpleNamespace(session=SimpleNamespace(layout=layout, node_id="n1", token="tok"))
        self.behaviour = None
        self.loaded = False
        self.stop = threading.Event()

    def _load_work(self):
        if self.behaviour is not None and not self.loaded:  # as Node._load_work: prepare_data once
            self.loaded = True
            self.x, self.y = self.behaviour.prepare_data(self.x, self.y, 5)
        return None, self.x, self.y, 5

    def train(self, task, data=None):
        self._load_work()
        self.trained_on.append(data)
        return self.benign.clone(), 20

    def upload(self, task, delta, n, **overrides) -> bool:
        self.uploads.append((delta.clone(), n, overrides))
        return not overrides


# --------------------------------------------------------------------------- spec and start-up

def test_unknown_key_attack_or_param_refuses_to_start():
    with pytest.raises(BehaviourError, match="no key 'atack'"):
        Behaviour.from_json(json.dumps({"atack": "sign_flip"}), "x")
    with pytest.raises(BehaviourError, match="unknown attack"):
        behaviour(attack="sign_flop")
    with pytest.raises(BehaviourError, match="no parameter 'scal'"):
        behaviour(attack="sign_flip", attack_params={"scal": 2})
    with pytest.raises(BehaviourError, match="schedule"):
        behaviour(attack="sign_flip", schedule={"start": 2})


def test_omniscient_attack_refuses_to_start_without_the_adversary_view():
    with pytest.raises(BehaviourError, match="needs the adversary view"):
        behaviour(attack="mimic")
    with pytest.raises(BehaviourError, match="needs the adversary view"):
        behaviour(attack="ipm", knowledge="omniscient", adversary={"address": "127.0.0.1:1"})  # no token
    b = behaviour(attack="mimic", adversary={"address": "127.0.0.1:1", "token": TOKEN})
    assert b.knowledge == "omniscient"
    b.close()


def test_knowledge_below_the_attacks_needs_and_rule_aware_without_rule_are_refused():
    with pytest.raises(BehaviourError, match="less than attack 'alie' needs"):
        behaviour(attack="alie", knowledge="own")
    with pytest.raises(BehaviourError, match="needs the defense rule"):
        behaviour(attack="alie_opt")


# --------------------------------------------------------------------------- schedule, churn

def test_schedule_decides_activity_and_inactive_rounds_are_honest():
    b = behaviour(attack="sign_flip", attack_params={"scale": 2.0}, schedule={"start_round": 2})
    node = FakeNode()
    b.run_round(node, task(1))
    b.run_round(node, task(2))
    assert torch.equal(node.uploads[0][0], node.benign)
    assert torch.allclose(node.uploads[1][0], -2.0 * node.benign)


def test_probability_schedule_is_shared_by_a_role_and_reproducible():
    a = behaviour(attack="sign_flip", schedule={"probability": 0.5})
    b = Behaviour(BehaviourSpec(byzantine=True, seed=3, role="byz", attack="sign_flip",
                                schedule={"probability": 0.5}), "byz-001")
    decisions = [a.is_active(r) for r in range(40)]
    assert decisions == [b.is_active(r) for r in range(40)]
    assert 8 < sum(decisions) < 32


def test_dropout_skips_the_round_without_upload_and_is_seeded():
    b = Behaviour(BehaviourSpec(dropout=1.0), "honest-000")
    node = FakeNode()
    b.run_round(node, task(0))
    assert node.uploads == [] and node.trained_on == []
    t0 = time.monotonic()
    b.run_round(node, task(0))  # the open round offers the task again: wait, do nothing
    assert node.uploads == [] and 0.5 < time.monotonic() - t0 < 2
    half = Behaviour(BehaviourSpec(dropout=0.5, seed=1), "honest-000")
    drops = [half.drops_out(r) for r in range(60)]
    assert drops == [half.drops_out(r) for r in range(60)]
    assert 15 < sum(drops) < 45


def test_leave_and_rejoin_rounds():
    leaver = Behaviour(BehaviourSpec(leave_at_round=3), "h")
    assert leaver.keep_going(None, task(2)) and not leaver.keep_going(None, task(3))
    assert not leaver.keep_going(None, Task("wait", round=5))
    back = Behaviour(BehaviourSpec(leave_at_round=3, rejoin_at_round=6), "h")
    assert not back.keep_going(None, task(4)) and back.keep_going(None, task(6))


# --------------------------------------------------------------------------- attacks through the node

def test_update_attack_gets_n_f_and_global_weights():
    b = behaviour(attack="untargeted", attack_params={"tau": 2.0}, f=3)
    node = FakeNode()
    b.run_round(node, task(4, n=10))
    g = torch.Generator().manual_seed(derive_seed(3, "attack", 4, "byz-000"))
    expected = build_attack("untargeted", {"tau": 2.0}).craft(
        AttackContext(n=10, f=3, generator=g, global_weights=task(4).weights))
    assert torch.allclose(node.uploads[0][0], expected)
    assert node.uploads[0][1] == 20


def test_data_attack_trains_on_the_poisoned_copy_only_when_active():
    b = behaviour(attack="label_flip", schedule={"start_round": 1})
    node = FakeNode()
    node.behaviour = b
    b.run_round(node, task(0))
    b.run_round(node, task(1))
    assert node.trained_on[0] is None  # honest round: the clean shard
    x, y = node.trained_on[1]
    assert torch.equal(x, node.x) and bool((y != node.y).all())


@pytest.mark.parametrize("mode, key", [("bad_checksum", "crc32"), ("wrong_dtype", "dtype"), ("wrong_round", "round"),
                                       ("wrong_layout", "layout_hash"), ("bad_token", "session_token")])
def test_malformed_modes_corrupt_the_header(mode, key):
    b = behaviour(attack="malformed", attack_params={"mode": mode})
    node = FakeNode()
    b.run_round(node, task(2))
    (delta, _, overrides), = node.uploads
    assert list(overrides) == [key]
    if mode == "bad_checksum":
        assert overrides["crc32"] != codec.crc32(codec.tensor_bytes(delta))
    if mode == "wrong_round":
        assert overrides["round"] == 1_000_002


def test_malformed_size_and_duplicate():
    node = FakeNode()
    behaviour(attack="malformed", attack_params={"mode": "wrong_size"}).run_round(node, task())
    assert node.uploads[0][0].numel() == D - 1
    node = FakeNode()
    behaviour(attack="malformed", attack_params={"mode": "duplicate"}).run_round(node, task())
    assert len(node.uploads) == 2 and torch.equal(node.uploads[0][0], node.uploads[1][0])


def test_rule_aware_attack_runs_the_scenarios_defense():
    b = behaviour(attack="alie_opt", attack_params={"grid": 3, "refine": 1}, defense={"name": "mean", "params": {}, "f": 1})
    node = FakeNode()
    b.run_round(node, task())
    assert node.uploads and torch.isfinite(node.uploads[0][0]).all()


# --------------------------------------------------------------------------- collusion service

@pytest.fixture
def collusion():
    server = CollusionServer(["byz-000", "byz-001", "byz-002"], TOKEN)
    yield server
    server.stop(0)


def test_framing_checks():
    assert parse_header(header_frame({"a": 1})) == {"a": 1}
    for bad in (b"", b"D{}", b"Hnot json", b"H[1]"):
        with pytest.raises(ValueError):
            parse_header(bad)
    buf = tensor_payload(torch.arange(5.0))
    frames = list(data_frames(buf, chunk_bytes=8))
    crc = codec.crc32(buf)
    assert assemble(frames, 20, crc).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="CRC"):
        assemble(frames, 20, crc ^ 1)
    with pytest.raises(ValueError, match="more than"):
        assemble(frames, 16, crc)
    with pytest.raises(ValueError, match="ended after"):
        assemble(frames, 24, crc)


def test_colluders_share_deltas_sorted_by_member(collusion):
    clients = [CollusionClient(collusion.address, TOKEN, f"byz-00{i}") for i in range(3)]
    rows = [torch.full((D,), float(i)) for i in range(3)]
    for c in clients:
        c.announce(5)
    out = {}

    def member(i):
        clients[i].post(5, rows[i])
        out[i] = clients[i].fetch(5, timeout=10)
    threads = [threading.Thread(target=member, args=(i,)) for i in (2, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    for i in range(3):
        members, got = out[i]
        assert members == ["byz-000", "byz-001", "byz-002"]
        assert torch.equal(got, torch.stack(rows))
    assert collusion.service.history[5]["posted"] == members
    for c in clients:
        c.close()


def test_fetch_returns_what_arrived_at_the_timeout(collusion):
    a = CollusionClient(collusion.address, TOKEN, "byz-000")
    CollusionClient(collusion.address, TOKEN, "byz-001").announce(1)  # announces, never posts
    a.announce(1)
    a.post(1, torch.ones(D))
    t0 = time.monotonic()
    members, rows = a.fetch(1, timeout=0.5)
    assert members == ["byz-000"] and rows.shape == (1, D)
    assert 0.4 < time.monotonic() - t0 < 5


def test_collusion_refuses_wrong_token_outsiders_and_bad_rows(collusion):
    with pytest.raises(CollusionError, match="UNAUTHENTICATED"):
        CollusionClient(collusion.address, "x" * 32, "byz-000").post(0, torch.ones(D))
    with pytest.raises(CollusionError, match="UNAUTHENTICATED"):
        CollusionClient(collusion.address, TOKEN, "honest-000").fetch(0, timeout=0.1)
    a = CollusionClient(collusion.address, TOKEN, "byz-000")
    a.post(0, torch.ones(D))
    with pytest.raises(CollusionError, match="INVALID_ARGUMENT"):
        CollusionClient(collusion.address, TOKEN, "byz-001").post(0, torch.ones(D + 1))
    with pytest.raises(CollusionError, match="finite"):
        a.post(1, torch.full((D,), float("nan")))


def test_alie_colluders_through_the_service_send_the_same_row(collusion):
    spec = {"attack": "alie", "f": 3, "collusion": {"address": collusion.address, "token": TOKEN, "timeout": 10}}
    nodes = [FakeNode(seed=i) for i in range(3)]
    bs = [Behaviour(BehaviourSpec(byzantine=True, seed=3, role="alie", **spec), f"byz-00{i}") for i in range(3)]
    threads = [threading.Thread(target=bs[i].run_round, args=(nodes[i], task(0))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    sent = [n.uploads[0][0] for n in nodes]
    benign = torch.stack([n.benign for n in nodes])
    z = alie_default_z(10, 3)
    expected = benign.mean(0) + z * benign.std(0, correction=1)
    for row in sent:
        assert torch.equal(row, sent[0])
        assert torch.allclose(row, expected, atol=1e-5)


# --------------------------------------------------------------------------- adversary view

class _ViewCoord:
    """The parts of the Coordinator the adversary view reads."""

    def __init__(self):
        from orchestrator.membership import Membership
        from orchestrator.rounds import RoundKeeper
        from orchestrator.rowstore import RowStore
        self.s = SimpleNamespace(name="unit", adversary=SimpleNamespace(omniscient=True, view_timeout=5.0))
        self.membership = Membership("fed", 60.0)
        self.keeper = RoundKeeper()
        self.store = RowStore(D)
        self.shutdown = threading.Event()
        self.byzantine_names = {"byz-000"}
        self.ids = {}
        for name in ("honest-000", "honest-001", "byz-000"):
            m, _ = self.membership.join(name, "secret", "fed", 10, 0)
            self.ids[name] = m

    def open_round(self, round_id):
        selected = {m.node_id for m in self.ids.values()}
        self.store.open_round(sorted(selected))
        return self.keeper.open(round_id, 0, selected, 30.0, 1.0)


@pytest.fixture
def view():
    from orchestrator.adversary import add_adversary_view
    coord = _ViewCoord()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = add_adversary_view(server, coord)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = AdversaryViewClient(f"127.0.0.1:{port}", servicer.token)
    client.address = f"127.0.0.1:{port}"
    yield coord, servicer, client
    client.close()
    server.stop(0)


def _upload(coord, rnd, name, value):
    from orchestrator.rounds import Upload
    m = coord.ids[name]
    coord.keeper.begin_upload(m.node_id, rnd.round_id, rnd.model_version)
    coord.store.claim(m.node_id).write(0, torch.full((D,), value).numpy().tobytes())
    coord.keeper.finish_upload(rnd, Upload(m.node_id, 10, 4 * D, 0.0))


def test_view_serves_only_honest_rows_once_they_arrived(view):
    coord, servicer, client = view
    rnd = coord.open_round(3)
    _upload(coord, rnd, "honest-000", 1.0)
    threading.Timer(0.4, _upload, args=(coord, rnd, "honest-001", 2.0)).start()
    byz = coord.ids["byz-000"]
    t0 = time.monotonic()
    rows = client.honest_updates(byz.node_id, byz.token, 3, 5.0)
    assert time.monotonic() - t0 >= 0.3  # waited for the second honest upload
    assert sorted(rows[:, 0].tolist()) == [1.0, 2.0] and rows.shape == (2, D)
    assert servicer.served[3] == [("byz-000", 2, 2)]


def test_view_refuses_wrong_token_honest_callers_and_closed_rounds(view):
    coord, servicer, client = view
    rnd = coord.open_round(0)
    byz, honest = coord.ids["byz-000"], coord.ids["honest-000"]
    bad = AdversaryViewClient(client.address, "wrong")
    with pytest.raises(grpc.RpcError) as e:
        bad.honest_updates(byz.node_id, byz.token, 0, 0.1)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad.close()
    with pytest.raises(grpc.RpcError) as e:
        client.honest_updates(honest.node_id, honest.token, 0, 0.1)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        client.honest_updates(byz.node_id, byz.token, 1, 0.1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.honest_updates(byz.node_id, byz.token, 0, 0.2) is None  # nothing arrived in time
    rnd.closed = True
    with pytest.raises(grpc.RpcError) as e:
        client.honest_updates(byz.node_id, byz.token, 0, 0.1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_view_is_not_registered_without_the_flag():
    from orchestrator.adversary import add_adversary_view
    coord = _ViewCoord()
    coord.s.adversary.omniscient = False
    assert add_adversary_view(grpc.server(futures.ThreadPoolExecutor(max_workers=1)), coord) is None


# --------------------------------------------------------------------------- scenario checks

def _scenario(roles, **sections):
    from orchestrator.scenario import from_dict
    return from_dict({"roles": [{"name": "honest", "count": 3}] + roles, **sections})


@pytest.mark.parametrize("role, sections, match", [
    ({"attack": "sign_flop"}, {}, "unknown attack"),
    ({"attack": "sign_flip", "attack_params": {"scal": 1}}, {}, "no parameter 'scal'"),
    ({"attack": "sign_flip", "schedule": {"start": 1}}, {}, "schedule"),
    ({"attack": "alie", "knowledge": "own"}, {}, "less than attack 'alie' needs"),
    ({"attack": "mimic"}, {}, r"needs the adversary view"),
    ({"attack": "ipm", "knowledge": "omniscient"}, {}, r"needs the adversary view"),
    ({"attack": "mimic"}, {"adversary": {"omniscient": True}, "federation": {"host": "0.0.0.0"}}, "loopback"),
    ({"attack": "sign_flip", "leave_at_round": 2, "rejoin_at_round": 1}, {}, "rejoin_at_round"),
])
def test_scenario_refuses_bad_byzantine_roles(role, sections, match):
    from orchestrator.scenario import ScenarioError
    with pytest.raises(ScenarioError, match=match):
        _scenario([{"name": "byz", "byzantine": True, **role}], **sections)


def test_scenario_accepts_omniscient_with_the_flag_and_decides_collusion():
    from orchestrator.adversary import wants_collusion
    s = _scenario([{"name": "byz", "byzantine": True, "attack": "mimic"}], adversary={"omniscient": True})
    assert s.adversary.omniscient and not wants_collusion(s)
    s = _scenario([{"name": "byz", "byzantine": True, "attack": "alie"}])
    assert wants_collusion(s)
    s = _scenario([{"name": "byz", "count": 2, "byzantine": True, "attack": "sign_flip"}])
    assert wants_collusion(s)
