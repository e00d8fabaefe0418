"""Session tokens that carry their epoch (expiry, rotation, one epoch of slack) and
enrolled node names, without a server (``orchestrator/identity.py``, ``membership.py``,
``enrolment.py``). The same over real gRPC: tests/integration/test_enrol.py."""
from __future__ import annotations

import re
import stat

import grpc
import pytest

from orchestrator.enrolment import Enrolment, NotEnrolled, enrolment_for, write_folder
from orchestrator.errors import Refusal
from orchestrator.group import RankMembership
from orchestrator.identity import SessionKeys, TokenRefused
from orchestrator.membership import Membership, NameTaken
from orchestrator.scenario import ScenarioError
from tests.integration.harness import scenario


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_token_is_accepted_for_its_epoch_and_one_either_side_then_expires():
    clock = Clock(1000.0)
    keys = SessionKeys(token_seconds=10.0, clock=clock)
    node = keys.node_id(3, "honest-003")
    token = keys.token(node)
    assert token.startswith("100.") and keys.verify(node, token) == 100
    clock.t = 1019.9  # the next epoch: still accepted (the node picks up the rotation meanwhile)
    assert keys.check_token(node, token) and keys.token(node) != token
    clock.t = 1020.0
    with pytest.raises(TokenRefused) as e:
        keys.verify(node, token)
    assert e.value.expired and "session token expired" in str(e.value) and "re-join" in str(e.value)
    assert "token_seconds = 10 s" in str(e.value) and token.split(".")[1] not in str(e.value)
    clock.t = 990.0  # a rank whose clock lags the leader's by under an epoch
    assert keys.check_token(node, token)
    clock.t = 980.0
    with pytest.raises(TokenRefused) as e:
        keys.verify(node, token)
    assert not e.value.expired and "ahead" in str(e.value)


def test_a_token_binds_its_node_and_its_epoch():
    keys = SessionKeys(token_seconds=10.0, clock=Clock())
    a, b = keys.node_id(0, "a"), keys.node_id(1, "b")
    token = keys.token(a)
    assert not keys.check_token(b, token)  # one node's token never acts as another
    epoch, mac = token.split(".")
    assert not keys.check_token(a, f"{int(epoch) + 1}.{mac}")  # its epoch cannot be moved on
    assert not keys.check_token(a, mac) and not keys.check_token(a, "")
    assert not SessionKeys(token_seconds=10.0, clock=Clock()).check_token(a, token)  # another run's key
    with pytest.raises(ValueError):
        SessionKeys(token_seconds=0)


def test_heartbeats_rotate_the_token_and_an_expired_one_needs_a_rejoin():
    clock = Clock(1000.0)
    keys = SessionKeys(token_seconds=10.0, clock=clock)
    m = Membership("fed", 1e6, keys=keys, index_of={"a": 0, "b": 1}.__getitem__)
    member, _ = m.join("a", "s", "fed", 1, 0)
    old = member.token
    assert m.heartbeat(member.node_id, old).token == old  # same epoch: nothing to hand
    clock.t = 1012.0
    fresh = m.heartbeat(member.node_id, old).token
    assert fresh != old and fresh.startswith("101.")
    assert m.authenticate(member.node_id, old) and m.authenticate(member.node_id, fresh)  # the slack epoch
    clock.t = 1025.0
    with pytest.raises(Refusal) as e:
        m.heartbeat(member.node_id, old)
    assert e.value.reason == "unauthenticated" and "session token expired" in e.value.message
    again, rejoined = m.join("a", "s", "fed", 1, 1)  # the node secret gets a token of now back
    assert rejoined and again.node_id == member.node_id and again.token.startswith("102.")
    other, _ = m.join("b", "t", "fed", 1, 1)
    with pytest.raises(Refusal) as e:
        m.authenticate(other.node_id, again.token)
    assert e.value.reason == "unauthenticated" and "does not belong" in e.value.message


def test_an_ingest_rank_refuses_an_expired_token_with_the_same_message():
    clock = Clock(1000.0)
    keys = SessionKeys(token_seconds=10.0, clock=clock)
    rm = RankMembership(SessionKeys(keys.key, 10.0, clock), {0: "a"}, 5.0, rank=1)
    node = keys.node_id(0, "a")
    token = keys.token(node)
    assert rm.authenticate(node, token).name == "a"
    clock.t = 1030.0
    with pytest.raises(Refusal) as e:
        rm.authenticate(node, token)
    assert e.value.reason == "unauthenticated" and "session token expired" in e.value.message


def test_enrolled_names_join_only_with_their_secret():
    enrol = Enrolment()
    m = Membership("fed", 5.0, enrolment=enrol)
    with pytest.raises(NotEnrolled) as e:  # a squatter with the federation token, before the node joined
        m.join("a", "guess", "fed", 1, 0)
    assert e.value.reason == "unauthenticated" and "'a'" in e.value.message and "guess" not in e.value.message
    member, _ = m.join("a", enrol.secret("a"), "fed", 1, 0)
    with pytest.raises(NotEnrolled):  # nor after: the name is not taken over either
        m.join("a", enrol.secret("b"), "fed", 1, 0)
    again, rejoined = m.join("a", enrol.secret("a"), "fed", 1, 1)
    assert rejoined and again.node_id == member.node_id
    with pytest.raises(Refusal) as e:  # the federation token is still checked first
        m.join("a", enrol.secret("a"), "wrong", 1, 1)
    assert "federation token" in e.value.message
    assert not isinstance(e.value, NameTaken)


def test_the_enrolment_folder_is_private_and_reused(tmp_path):
    d = tmp_path / "enrol"
    first = write_folder(d, ["a", "b"])
    assert stat.S_IMODE((d / "enrol.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "a.secret").stat().st_mode) == 0o600
    assert (d / "b.secret").read_text().strip() == first.secret("b")
    assert write_folder(d, ["a"]).key == first.key  # a resumed run (or a second launcher) reuses it
    assert enrolment_for(scenario(security={"enrol": True}), tmp_path).key == first.key
    assert enrolment_for(scenario(), tmp_path) is None
    with pytest.raises(FileNotFoundError, match="launch.sh enrol"):
        enrolment_for(scenario(security={"enrol": True, "enrol_dir": str(tmp_path / "none")}), tmp_path)


@pytest.mark.parametrize("security, match", [
    ({"token_seconds": 0.5}, "security.token_seconds = 0.5 must be 0 (auto: max(600, lease_seconds)) or in 1 .. 604800"),
    ({"token_seconds": 1e9}, "security.token_seconds"),
    ({"token_seconds": 1}, "federation.lease_seconds / 2"),
    ({"enrol_dir": "x"}, "security.enrol_dir"),
])
def test_bad_security_keys_name_the_key(security, match):
    with pytest.raises(ScenarioError, match=re.escape(match)):
        scenario(security=security, federation={"lease_seconds": 6.0})


class _Refused(grpc.RpcError):
    def __init__(self, code, details: str, trailer: str = "") -> None:
        self._code, self._details, self._trailer = code, details, trailer

    def code(self):
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return (("byzfed-refusal", self._trailer),) if self._trailer else ()


def test_a_node_tells_a_missing_enrolment_secret_from_other_refusals():
    from fednode.node import name_taken, not_enrolled

    refused = _Refused(grpc.StatusCode.UNAUTHENTICATED, "node name 'a' is enrolled ...", "not-enrolled")
    assert not_enrolled(refused) and not name_taken(refused)
    assert not not_enrolled(_Refused(grpc.StatusCode.UNAUTHENTICATED, "federation token is wrong"))
    assert not not_enrolled(_Refused(grpc.StatusCode.UNAUTHENTICATED, "x", "name-taken"))


def test_a_node_reads_its_secret_from_a_file(tmp_path, monkeypatch):
    import fednode.__main__ as main
    from fednode import node

    (tmp_path / "a.secret").write_text("s3cret\n")
    seen = {}

    class Stop(Exception):
        pass

    def fake_node(cfg, behaviour):
        seen["secret"] = cfg.secret
        raise Stop

    monkeypatch.setattr(node, "Node", fake_node)
    monkeypatch.delenv("BYZFED_NODE_SECRET", raising=False)
    with pytest.raises(Stop):
        main.main(["--orchestrator", "127.0.0.1:1", "--name", "a", "--token", "t",
                   "--secret-file", str(tmp_path / "a.secret")])
    assert seen["secret"] == "s3cret"
    assert main.main(["--orchestrator", "127.0.0.1:1", "--name", "a", "--token", "t",
                      "--secret-file", str(tmp_path / "none")]) == 2


def test_the_launcher_hands_each_local_node_its_enrolment_secret_in_the_environment(tmp_path):
    from orchestrator.launch import NodeLaunch

    s = scenario(roles=[{"name": "honest", "count": 2}], security={"enrol": True})
    launch = NodeLaunch(s, "127.0.0.1:1", "tok", tmp_path)
    enrol = enrolment_for(s, tmp_path)
    for name in ("honest-000", "honest-001"):
        p = launch.describe(name)
        assert p.env["BYZFED_NODE_SECRET"] == enrol.secret(name)
        assert not any(enrol.secret(name) in a for a in p.argv)  # never on a command line
    plain = NodeLaunch(scenario(roles=[{"name": "honest", "count": 1}]), "127.0.0.1:1", "tok", tmp_path / "p")
    assert plain.describe("honest-000").env["BYZFED_NODE_SECRET"] == ""  # (not inherited either)


def test_the_default_token_epoch_follows_a_long_lease():
    long = scenario(federation={"lease_seconds": 3600.0})  # (the default, 0, is valid with any lease)
    assert long.security.token_epoch(3600.0) == 3600.0
    assert scenario().security.token_epoch(6.0) == 600.0
