"""Revocation lists (``orchestrator/revocation.py``), what membership does with them, the
``[security] revoked`` key and ``python -m orchestrator revoke``."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from orchestrator.errors import Refusal
from orchestrator.membership import Membership
from orchestrator.revocation import (FILE, RevocationError, Revocations, Revoked, append, cert_id, parse_line,
                                     path_of)
from orchestrator.scenario import ScenarioError, from_dict

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_parse_to_normalised_entries_and_bad_lines_name_the_allowed_forms():
    assert parse_line("  # a comment") is None and parse_line("") is None
    assert parse_line("honest-003") == ("name", "honest-003")
    assert parse_line("name honest-003  # why") == ("name", "honest-003")
    assert parse_line("serial 00:0A:fF") == ("serial", "aff")
    fp = "AB:" * 31 + "CD"
    assert parse_line(f"sha256 {fp}") == ("sha256", ("ab" * 31) + "cd")
    for bad, words in (("cert honest-003", "'name NODE', 'serial HEX', 'sha256 HEX'"),
                       ("serial xyz", "not hexadecimal"), ("sha256 abcd", "has 4 hex digits, not 64"),
                       ("name a b", "is not an entry"), ("name " + "x" * 129, "over 128")):
        with pytest.raises(RevocationError, match=words):
            parse_line(bad)


def test_the_list_is_reread_when_it_changes_at_most_once_a_second(tmp_path):
    clock, path = Clock(), tmp_path / FILE
    rev = Revocations.load(path, clock=clock)  # no file yet: nothing revoked
    assert not rev.name_revoked("honest-001")
    append(path, ["name honest-001"])
    assert not rev.name_revoked("honest-001")  # looked at less than a second ago
    clock.t = 1.01
    assert rev.name_revoked("honest-001") and not rev.name_revoked("honest-000")
    reloads = rev.reloads
    for i in range(50):  # unchanged file: stat()ed at most once per second, never re-read
        clock.t = 2.0 + i * 0.1
        assert rev.name_revoked("honest-001")
    assert rev.reloads == reloads
    path.write_text("# lifted\nname honest-002\n")  # a line removed lifts that revocation
    clock.t = 10.0
    assert not rev.name_revoked("honest-001") and rev.name_revoked("honest-002")


def test_a_bad_line_fails_the_start_and_is_skipped_while_running(tmp_path, caplog):
    path = tmp_path / FILE
    path.write_text("name honest-000\nserial nothex\n")
    with pytest.raises(RevocationError, match=r"revoked.txt, line 2: serial 'nothex' is not hexadecimal"):
        Revocations.load(path)
    with pytest.raises(RevocationError, match="is a folder"):
        Revocations.load(tmp_path)
    path.write_text("name honest-000\n")
    clock = Clock()
    rev = Revocations.load(path, clock=clock)
    path.write_text("name honest-000\nbogus line here\nname honest-004\n")
    clock.t = 5.0
    assert rev.name_revoked("honest-000") and rev.name_revoked("honest-004")
    assert "line 2" in caplog.text and "line skipped" in caplog.text


def test_append_is_atomic_private_and_does_not_repeat_lines(tmp_path):
    path = tmp_path / "sub" / FILE
    append(path, ["name honest-001"])
    append(path, ["name honest-001", "serial 1f"])
    text = path.read_text()
    assert text.count("name honest-001") == 1 and "serial 1f" in text and text.startswith("# byzfed")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(RevocationError):
        append(path, ["serial zz"])
    assert path.read_text() == text  # nothing written for a bad line
    # writers at once (threads) and a reader that never sees a partial file
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=append, args=(path, [f"name n-{i:03d}"])) for i in range(20)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
    stop.set()
    reader.join(30)
    final = path.read_text()
    assert all(f"name n-{i:03d}\n" in final for i in range(20))
    assert all(s.endswith("\n") for s in seen)  # (every line whole, every time)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{FILE}.")]  # no temporary files left


def test_certificates_are_matched_by_serial_or_fingerprint(tmp_path):
    from proto.certs import client_paths, write_bundle

    d = write_bundle(tmp_path / "certs", [], ["honest-000", "honest-001"])
    pem0, pem1 = (client_paths(d, n)[0].read_bytes() for n in ("honest-000", "honest-001"))
    id0, id1 = cert_id(pem0), cert_id(pem1)
    assert id0.subject == "honest-000" and len(id0.sha256) == 64 and id0.serial != id1.serial
    from cryptography import x509
    assert int(id0.serial, 16) == x509.load_pem_x509_certificate(pem0).serial_number
    clock, path = Clock(), tmp_path / FILE
    rev = Revocations.load(path, clock=clock)
    assert rev.cert_revoked(pem0) is None
    append(path, [f"serial {id0.serial.upper()}"])
    clock.t = 2.0
    assert rev.cert_revoked(pem0) == id0 and rev.cert_revoked(pem1) is None
    path.write_text(f"sha256 {':'.join(id1.sha256[i:i + 2] for i in range(0, 64, 2))}\n")
    clock.t = 4.0
    assert rev.cert_revoked(pem1) == id1 and rev.cert_revoked(pem0) is None
    assert rev.cert_revoked(b"") is None and rev.cert_revoked(b"not a pem") is None


def test_membership_refuses_a_revoked_name_ends_its_session_and_evicts_it(tmp_path):
    revoked: set[str] = set()
    m = Membership("tok", 10.0)
    m.revoked = revoked.__contains__
    a, _ = m.join("a", "sa", "tok", 1, 0)
    b, _ = m.join("b", "sb", "tok", 1, 0)
    m.drain_events()
    revoked.add("b")
    with pytest.raises(Revoked) as e:  # its session token stops working (and it is evicted at once)
        m.heartbeat(b.node_id, b.token)
    assert e.value.reason == "permission_denied" and e.value.message == "node 'b' is revoked"
    assert not m.is_alive(b.node_id) and m.evict_reasons[b.node_id] == "revoked"
    assert m.drain_events() == [("evict", b.node_id), ("revoked", b.node_id)]
    for secret in ("sb", "other"):  # its secret stops working: refused, not a name conflict
        with pytest.raises(Revoked, match="node 'b' is revoked"):
            m.join("b", secret, "tok", 1, 1)
    with pytest.raises(Refusal, match="federation token is wrong"):  # the token is still checked first
        m.join("b", "sb", "wrong", 1, 1)
    assert m.heartbeat(a.node_id, a.token) is a  # the others are untouched
    # a live member revoked without calling: expire() evicts it (reason revoked), before the next selection
    revoked.add("a")
    assert [x.name for x in m.expire()] == ["a"] and not m.alive()
    assert m.drain_events() == [("evict", a.node_id), ("revoked", a.node_id)]
    assert m.expire() == []  # once
    revoked.clear()  # the line removed: it may join again (same node id)
    again, rejoined = m.join("b", "sb", "tok", 1, 2)
    assert rejoined and again.node_id == b.node_id and m.is_alive(b.node_id)


def test_lease_expiry_keeps_its_reason():
    clock = Clock()
    m = Membership("tok", 1.0, clock=clock)
    m.revoked = lambda name: False
    a, _ = m.join("a", "s", "tok", 1, 0)
    clock.t = 2.0
    assert [x.node_id for x in m.expire()] == [a.node_id] and m.evict_reasons[a.node_id] == "lease"


def test_enrolled_names_revoked_are_refused_with_their_secret(tmp_path):
    from orchestrator.enrolment import write_folder

    enrol = write_folder(tmp_path / "enrol", ["a"])
    m = Membership("tok", 10.0, enrolment=enrol)
    m.revoked = {"a"}.__contains__
    with pytest.raises(Revoked, match="node 'a' is revoked"):
        m.join("a", enrol.secret("a"), "tok", 1, 0)


def test_the_scenario_key_is_validated_and_defaults_to_the_run_folder(tmp_path):
    assert from_dict({}).security.revoked == ""
    assert path_of(from_dict({}), tmp_path) == tmp_path / FILE
    assert path_of(from_dict({"security": {"revoked": "/srv/x.txt"}}), tmp_path) == Path("/srv/x.txt")
    with pytest.raises(ScenarioError, match="security.revoked must be a string, got 3"):
        from_dict({"security": {"revoked": 3}})
    for bad in (" x.txt", "dir/"):
        with pytest.raises(ScenarioError, match=r"security.revoked = .* must be a file path"):
            from_dict({"security": {"revoked": bad}})


def _revoke(*args: str) -> subprocess.CompletedProcess:
    """``python -m orchestrator revoke ARGS`` (its ``main``, in this process: a fresh
    interpreter costs seconds of imports on a loaded machine)."""
    import contextlib
    import io

    from orchestrator.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["revoke", *args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_the_revoke_command_checks_the_roster_and_appends_name_and_certificate(tmp_path):
    from proto.certs import client_paths, write_bundle

    run = tmp_path / "run"
    run.mkdir()
    (run / "scenario.json").write_text(json.dumps(from_dict({"roles": [{"name": "honest", "count": 3}]}).to_dict()))
    p = _revoke(str(run), "honest-009")
    assert p.returncode == 2 and "node 'honest-009' is not in the run's roster" in p.stderr, p.stderr
    assert "'honest-000' .. 'honest-002'" in p.stderr and not (run / FILE).exists()
    p = _revoke(str(tmp_path / "nope"), "honest-000")
    assert p.returncode == 2 and "does not exist" in p.stderr
    d = write_bundle(tmp_path / "certs", [], ["honest-001"])
    pem = client_paths(d, "honest-001")[0]
    p = _revoke(str(run), "honest-001", "--cert", str(pem))
    assert p.returncode == 0, p.stderr
    cid = cert_id(pem.read_bytes())
    lines = (run / FILE).read_text().splitlines()
    assert lines[1:] == ["name honest-001", f"serial {cid.serial}", f"sha256 {cid.sha256}"]
    assert stat.S_IMODE(os.stat(run / FILE).st_mode) == 0o600
    for bad in ("a#b", "a b"):
        p = _revoke(str(tmp_path), bad)  # (no scenario.json there: the name alone is checked)
        assert p.returncode == 2 and "cannot be listed" in p.stderr, p.stderr
    p = _revoke(str(run), "honest-002", "--serial", "nothex")
    assert p.returncode == 2 and "not hexadecimal" in p.stderr
    # security.revoked in the run's scenario.json is where it appends
    other = tmp_path / "shared" / "list.txt"
    (run / "scenario.json").write_text(json.dumps(from_dict({"roles": [{"name": "honest", "count": 3}],
                                                             "security": {"revoked": str(other)}}).to_dict()))
    assert _revoke(str(run), "honest-002").returncode == 0
    assert "name honest-002" in other.read_text() and "honest-002" not in (run / FILE).read_text()
