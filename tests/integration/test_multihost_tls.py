"""TLS, mutual TLS and enrolled names across two machines: two Linux network namespaces
joined by a veth pair (``test_multihost.TwoHosts``), the orchestrator in A listening on
every interface, nodes in B started by hand with their own files, as an operator would.

- mutual TLS: certificates from ``proto.certs.write_bundle`` (what ``./launch.sh certs DIR
  --host A --nodes ...`` runs) naming A's address; each node in B presents its own
  certificate and trusts the CA; the rounds complete; from B, a client with the CA but no
  certificate and a plaintext client are refused (both holding the federation token);
- enrolment (``security.enrol``, TLS but no client certificates): a node with its
  ``--secret-file`` joins and completes the rounds, one without (the federation token
  only) is refused and exits with status 4.

Needs root and iproute2, else skipped with the reason (the ``hosts`` fixture). Every
process is stopped by its PID; the namespaces are deleted on every exit path.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.test_multihost import PORT, PY, TwoHosts, finish, hosts, write_scenario  # noqa: F401

# From B: wait until A's port accepts TCP connections, then try to join over a channel
# without a client certificate (trusting the CA) and over a plaintext channel.
REFUSED_PROBE = textwrap.dedent("""\
    import json, socket, sys, time
    import grpc
    from fednode.client import FederationClient
    from proto.tls import ClientTls
    host, port, ca, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    end = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    out = {}
    for what, tls in (("no-client-cert", ClientTls(ca)), ("plaintext", None)):
        client = FederationClient(f"{host}:{port}", tls_files=tls)
        assert (client.tls is None) == (tls is None)  # (no BYZFED_TLS_* here: None is plaintext)
        try:
            s = client.join("honest-000", "probe-secret", token, timeout=10.0)
            out[what] = {"joined": s.node_id}
        except grpc.RpcError as e:
            out[what] = {"code": e.code().name, "details": e.details()}
        client.close()
    print(json.dumps(out))
""")


def _scenario(path: Path, nodes: int, rounds: int, extra: str = "") -> Path:
    """``test_multihost``'s scenario with the lighter logreg model (the TLS, not training, is under test)."""
    p = write_scenario(path, [("honest", nodes, extra)], rounds=rounds)
    p.write_text(p.read_text().replace('name = "mlp"', 'name = "logreg"', 1))
    return p


def _serve(net: TwoHosts, scenario: Path, run_dir: Path, token: str, sets: list[str]):
    sets = ["federation.round_timeout=60.0", *sets]  # (a loaded CI machine trains slowly)
    argv = [PY, "-m", "orchestrator", "serve", str(scenario), "--host", "0.0.0.0", "--port", str(PORT),
            "--advertise-host", net.addr_a, "--token", token, "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    return net.spawn(net.a, "orchestrator", argv, run_dir.parent / "logs", env={"COLUMNS": "200"})


def _node(net: TwoHosts, name: str, token: str, log_dir: Path, *extra: str):
    argv = [PY, "-m", "fednode", "--orchestrator", f"{net.addr_a}:{PORT}", "--name", name, "--token", token, *extra]
    return net.spawn(net.b, name, argv, log_dir)


def test_mutual_tls_across_two_hosts_completes_and_refuses_clients_without_a_certificate(hosts, tmp_path):
    from proto.certs import client_paths, write_bundle

    names = ["honest-000", "honest-001"]
    certs = write_bundle(tmp_path / "certs", [hosts.addr_a], names)  # = ./launch.sh certs DIR --host A --nodes ..
    # each node machine gets only ca.pem and its own certificate and key
    node_files = {}
    for n in names:
        d = tmp_path / f"machine-{n}"
        d.mkdir()
        pem, key = client_paths(certs, n)
        for src in (certs / "ca.pem", pem, key):
            (d / src.name).write_bytes(src.read_bytes())
            (d / src.name).chmod(0o600)
        node_files[n] = d
    token, run_dir = secrets.token_hex(8), tmp_path / "run"
    scenario = _scenario(tmp_path / "mtls.toml", 2, rounds=3)
    t0 = time.monotonic()
    orch = _serve(hosts, scenario, run_dir, token, ["security.mtls=true", f'security.certs="{certs}"'])
    for n in names:
        d = node_files[n]
        _node(hosts, n, token, tmp_path / "logs", "--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / f"{n}.pem"),
              "--tls-key", str(d / f"{n}.key"))
    p = hosts.run_in(hosts.b, [PY, "-c", REFUSED_PROBE, hosts.addr_a, str(PORT), str(certs / "ca.pem"), token],
                     timeout=120)
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n{hosts.all_logs()}"
    refused = json.loads(p.stdout.strip().splitlines()[-1])
    rows = finish(hosts, orch, run_dir)
    took = time.monotonic() - t0
    assert [r["outcome"] for r in rows] == ["complete"] * 3, ([r["outcome"] for r in rows], hosts.all_logs())
    assert all(r["reported"] == 2 for r in rows)
    assert sorted(rows[0]["joined"]) == names  # the refused clients never joined (nor took honest-000's name)
    for what in ("no-client-cert", "plaintext"):  # refused in the handshake, before any RPC
        assert refused[what].get("code") == "UNAVAILABLE", refused
        # (A's port was open, the probe connected first: the TLS layer said no)
        assert "Connection refused" not in refused[what]["details"], refused
    for n in names:
        assert f"uploads to {hosts.addr_a}:{PORT}" in hosts.log(n), hosts.log(n)
    assert "upload failed" not in hosts.all_logs()
    print(f"mutual TLS across two hosts: 3 rounds in {took:.1f}s; refused: {refused}")


def test_enrolled_names_across_two_hosts_with_tls(hosts, tmp_path):
    from orchestrator.enrolment import write_folder
    from proto.certs import write_bundle

    names = ["honest-000", "honest-001"]
    enrol = tmp_path / "enrol"
    write_folder(enrol, names)  # = ./launch.sh enrol DIR --nodes ...
    certs = write_bundle(tmp_path / "certs", [hosts.addr_a], [])  # TLS, no client certificates
    token, run_dir = secrets.token_hex(8), tmp_path / "run"
    scenario = _scenario(tmp_path / "enrol.toml", 2, rounds=2)
    t0 = time.monotonic()
    orch = _serve(hosts, scenario, run_dir, token,
                  ["security.tls=true", f'security.certs="{certs}"', "security.enrol=true",
                   f'security.enrol_dir="{enrol}"', "federation.min_nodes=1"])
    ca = ["--tls-ca", str(certs / "ca.pem")]
    squatter = _node(hosts, "honest-001", token, tmp_path / "logs", *ca)  # the federation token, no secret
    # Its refusal first: the run needs only honest-000 and is over in seconds, and a squatter
    # that met a port not yet open would retry after the orchestrator had gone.
    try:
        status = squatter.wait(90)
    except subprocess.TimeoutExpired:
        status = None
    d = tmp_path / "machine-honest-000"  # only its own secret file, copied to "its machine"
    d.mkdir()
    (d / "honest-000.secret").write_text((enrol / "honest-000.secret").read_text())
    (d / "honest-000.secret").chmod(0o600)
    _node(hosts, "honest-000", token, tmp_path / "logs", *ca, "--secret-file", str(d / "honest-000.secret"))
    rows = finish(hosts, orch, run_dir)
    took = time.monotonic() - t0
    assert [r["outcome"] for r in rows] == ["complete"] * 2, ([r["outcome"] for r in rows], hosts.all_logs())
    assert all(r["reported"] == 1 and r["selected_nodes"] == ["honest-000"] for r in rows), rows
    assert sorted(n for r in rows for n in r["joined"]) == ["honest-000"]
    log = hosts.log("honest-001")
    assert status == 4 and "is enrolled (security.enrol)" in log, (status, log[-3000:])
    print(f"enrolled names + TLS across two hosts: 2 rounds in {took:.1f}s; the node without its secret exited "
          f"with status {status}")


@pytest.mark.slow
def test_a_client_certificate_revoked_mid_run_across_two_hosts(hosts, tmp_path):
    """Mutual TLS across the hosts; after round 0 the operator on A revokes honest-002 and its
    certificate (the lines ``./launch.sh revoke RUN_DIR honest-002 --cert PEM`` appends):
    that node in B is refused and evicted, the other two complete every round."""
    from orchestrator.revocation import FILE, append, cert_id
    from proto.certs import client_paths, write_bundle

    names, victim, rounds = ["honest-000", "honest-001", "honest-002"], "honest-002", 40
    certs = write_bundle(tmp_path / "certs", [hosts.addr_a], names)
    token, run_dir = secrets.token_hex(8), tmp_path / "run"
    # (hand-started nodes do not know their role's delays: rounds of a fraction of a second, so many)
    scenario = _scenario(tmp_path / "mtls.toml", 3, rounds=rounds)
    orch = _serve(hosts, scenario, run_dir, token, ["security.mtls=true", f'security.certs="{certs}"',
                                                    "federation.lease_seconds=15.0"])
    for n in names:
        pem, key = client_paths(certs, n)
        _node(hosts, n, token, tmp_path / "logs", "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(pem),
              "--tls-key", str(key))
    metrics, end = run_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < end and orch.poll() is None, hosts.all_logs()
        time.sleep(0.02)
    # what `./launch.sh revoke RUN_DIR honest-002 --cert PEM` appends (the command itself: test_revocation.py)
    cid = cert_id(client_paths(certs, victim)[0].read_bytes())
    append(run_dir / FILE, [f"name {victim}", f"serial {cid.serial}", f"sha256 {cid.sha256}"])
    rows = finish(hosts, orch, run_dir, timeout=240)
    assert [r["outcome"] for r in rows if r["outcome"] not in ("complete", "dead-nodes")] == [], rows
    assert len(rows) == rounds and all({"honest-000", "honest-001"} <= set(r["selected_nodes"]) for r in rows)
    assert [r["evicted_revoked"] for r in rows if "evicted_revoked" in r] == [[victim]], rows
    evicted = next(i for i, r in enumerate(rows) if "evicted_revoked" in r)
    assert 0 < evicted < rounds - 1, evicted
    assert all(victim not in r["selected_nodes"] and r["reported"] == 2 for r in rows[evicted:]), rows[evicted:]
    log = hosts.log(victim)
    assert "PERMISSION_DENIED" in log and f"client certificate of '{victim}'" in log, log[-3000:]
