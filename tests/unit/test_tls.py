"""TLS: certificates (proto/certs.py), credentials (proto/tls.py), [security] checks, and
real handshakes against a gRPC server on 127.0.0.1: what is accepted and what is refused."""
from __future__ import annotations

import datetime
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509

from orchestrator.__main__ import main as orchestrator_main
from orchestrator.launch import NodeLaunch, node_argv
from orchestrator.scenario import ScenarioError
from orchestrator.security import bundle, node_tls, server_tls
from proto import certs, tls
from tests.integration.harness import scenario

METHOD = "/byzfed.test.Echo/Ping"


def _echo_server(server_tls_files):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("byzfed.test.Echo", {
        "Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"pong:" + req)}),))
    port = tls.add_port(server, "127.0.0.1:0", server_tls_files)
    assert port
    server.start()
    return server, f"127.0.0.1:{port}"


def _ping(address: str, client) -> bytes:
    ch = tls.channel(address, (), client)
    try:
        return ch.unary_unary(METHOD)(b"x", timeout=5)
    finally:
        ch.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The run's bundle (server + one client), a foreign CA's client, an expired client."""
    root = tmp_path_factory.mktemp("pki")
    d = certs.write_bundle(root / "run", ["10.9.8.7", "orchestrator.example"], ["honest-000"])
    ca_cert = certs.load_cert(d / "ca.pem")
    from cryptography.hazmat.primitives import serialization
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    key, cert = certs.issue(ca_key, ca_cert, "honest-000", client=True, not_before=past - datetime.timedelta(days=1),
                            not_after=past)
    certs.write_key(root / "expired.key", key)
    certs.write_cert(root / "expired.pem", cert)
    other = certs.write_bundle(root / "other", [], ["honest-000"])
    return {"dir": d, "other": other, "expired": (str(root / "expired.pem"), str(root / "expired.key"))}


def test_bundle_files_modes_and_names(pki):
    d = pki["dir"]
    for key in [d / "ca.key", d / "server.key", d / "clients" / "honest-000.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    server = certs.load_cert(d / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "orchestrator.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "::1", "10.9.8.7"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    ca = certs.load_cert(d / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc <= datetime.timedelta(days=31)
    client = certs.load_cert(d / "clients" / "honest-000.pem")
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "honest-000"
    assert certs.covers(server, ["10.9.8.7"]) and not certs.covers(server, ["10.9.8.8"])


def test_bundle_keeps_its_ca_and_adds_what_is_missing(tmp_path):
    d = certs.write_bundle(tmp_path, [], ["a-000"])
    ca, server = (d / "ca.pem").read_bytes(), (d / "server.pem").read_bytes()
    client = (d / "clients" / "a-000.pem").read_bytes()
    certs.write_bundle(d, [], ["a-000", "b-000"])
    assert (d / "ca.pem").read_bytes() == ca and (d / "server.pem").read_bytes() == server
    assert (d / "clients" / "a-000.pem").read_bytes() == client and (d / "clients" / "b-000.pem").exists()
    certs.write_bundle(d, ["192.0.2.1"])  # a host the server certificate lacks: a new one, same CA
    assert (d / "ca.pem").read_bytes() == ca and (d / "server.pem").read_bytes() != server
    with pytest.raises(certs.CertError, match="cannot name a certificate file"):
        certs.write_bundle(d, [], ["../evil"])
    (d / "ca.key").unlink()  # a CA whose key is elsewhere is never replaced behind its users' backs
    with pytest.raises(certs.CertError, match="has ca.pem but no ca.key"):
        certs.write_bundle(d, [], ["c-000"])
    assert (d / "ca.pem").read_bytes() == ca


def test_certs_command(tmp_path, capsys):
    rc = orchestrator_main(["certs", str(tmp_path / "b"), "--host", "10.1.2.3", "--nodes", "x-000,x-001"])
    assert rc == 0, capsys.readouterr()
    assert {p.name for p in (tmp_path / "b" / "clients").iterdir()} == {"x-000.pem", "x-000.key", "x-001.pem",
                                                                         "x-001.key"}
    assert certs.covers(certs.load_cert(tmp_path / "b" / "server.pem"), ["10.1.2.3", "127.0.0.1"])
    assert orchestrator_main(["certs", str(tmp_path / "c"), "--nodes", "a/b"]) == 2
    assert "cannot name a certificate file" in capsys.readouterr().err


def test_tls_handshake_with_the_runs_ca_and_refusals(pki):
    d = pki["dir"]
    server, address = _echo_server(tls.ServerTls(str(d / "server.pem"), str(d / "server.key")))
    try:
        assert _ping(address, tls.ClientTls(str(d / "ca.pem"))) == b"pong:x"
        with pytest.raises(grpc.RpcError) as e:  # plaintext against TLS
            _ping(address, None)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as e:  # a client that trusts another CA
            _ping(address, tls.ClientTls(str(pki["other"] / "ca.pem")))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_mutual_tls_refuses_missing_foreign_and_expired_client_certs(pki):
    d, other = pki["dir"], pki["other"]
    server, address = _echo_server(tls.ServerTls(str(d / "server.pem"), str(d / "server.key"), str(d / "ca.pem"),
                                                 require_client_auth=True))
    ca = str(d / "ca.pem")
    good = tls.ClientTls(ca, str(d / "clients" / "honest-000.pem"), str(d / "clients" / "honest-000.key"))
    refused = {"no client certificate": tls.ClientTls(ca),
               "another CA's certificate": tls.ClientTls(ca, str(other / "clients" / "honest-000.pem"),
                                                         str(other / "clients" / "honest-000.key")),
               "an expired certificate": tls.ClientTls(ca, *pki["expired"]),
               "plaintext": None}
    try:
        assert _ping(address, good) == b"pong:x"
        for what, client in refused.items():
            with pytest.raises(grpc.RpcError) as e:
                _ping(address, client)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, what
        assert _ping(address, good) == b"pong:x"  # the refusals broke nothing
    finally:
        server.stop(0)


def test_client_tls_from_env_and_missing_files(tmp_path):
    files = tls.ClientTls("/ca.pem", "/c.pem", "/c.key")
    assert tls.ClientTls.from_env(files.env()) == files and tls.ClientTls.from_env({}) is None
    with pytest.raises(tls.TlsError, match="needs its key"):
        tls.ClientTls("/ca.pem", "/c.pem")
    with pytest.raises(tls.TlsError, match="cannot be read"):
        tls.ClientTls(str(tmp_path / "nope.pem")).credentials()


def test_security_section_checks():
    with pytest.raises(ScenarioError, match=r"security\.tls must be true or false"):
        scenario(security={"tls": "yes"})
    with pytest.raises(ScenarioError, match=r"unknown key 'security\.tsl'.*tls, mtls, certs"):
        scenario(security={"tsl": True})
    with pytest.raises(ScenarioError, match=r"security\.certs .* TLS is off"):
        scenario(security={"certs": "/somewhere"})
    with pytest.raises(ScenarioError, match=r"roles\[0\]\.name = 'a b': with security.mtls"):
        scenario(security={"mtls": True}, roles=[{"name": "a b", "count": 1}])
    assert scenario(security={"mtls": True}).security.enabled  # mtls implies tls
    assert not scenario().security.enabled


def test_run_bundle_and_node_launch(tmp_path):
    s = scenario(security={"mtls": True}, roles=[{"name": "honest", "count": 2}])
    d = bundle(s, tmp_path)
    assert d == tmp_path / "certs" and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert server_tls(s, tmp_path).require_client_auth
    assert node_tls(s, d, "honest-001").cert == str(d / "clients" / "honest-001.pem")
    proc = NodeLaunch(s, "127.0.0.1:1", "s3cret-token", tmp_path).describe("honest-000")
    assert "s3cret-token" not in " ".join(proc.argv) and "--token" not in proc.argv
    assert proc.env["BYZFED_TOKEN"] == "s3cret-token" and proc.env["BYZFED_TLS_CA"] == ""
    assert proc.argv[proc.argv.index("--tls-ca") + 1] == str(d / "ca.pem")
    assert proc.argv[proc.argv.index("--tls-cert") + 1] == str(d / "clients" / "honest-000.pem")
    plain = scenario(roles=[{"name": "honest", "count": 1}])
    assert "--tls-ca" not in node_argv("127.0.0.1:1", "honest-000", plain.roles[0], plain)
    assert bundle(plain, tmp_path / "p") is None and not (tmp_path / "p").exists()
    given = scenario(security={"tls": True, "certs": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="launch.sh certs"):
        bundle(given, tmp_path)
