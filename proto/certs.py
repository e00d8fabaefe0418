"""A run's certificates, made with the ``cryptography`` library (nothing hand-rolled).

One throwaway CA (self-signed, ECDSA P-256, :data:`DAYS` days), one server certificate
whose subject alternative names cover every host and IP the nodes dial (127.0.0.1, ::1,
localhost and the hosts given), and one client certificate per node (CN = the node's
name) for mutual TLS. A bundle directory holds::

    ca.pem  ca.key            the CA (keep ca.key off the node machines)
    server.pem  server.key    the orchestrator's, its ranks' and the collusion service's
    clients/<name>.pem  clients/<name>.key    one per node (mutual TLS)

Keys are written with mode 0600, certificates 0644, each by a rename, so a reader never
sees half a file. ``./launch.sh certs DIR`` (:func:`write_bundle`) makes one by hand; a
local run with ``security.tls = true`` and no ``security.certs`` makes one in
``RUN_DIR/certs`` (``orchestrator/security.py``).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 30
LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class CertError(ValueError):
    """A certificate cannot be made or a bundle is incomplete; the message says which."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str = "byzfed run CA", days: int = DAYS):
    """A self-signed CA: ``(key, certificate)``, valid from a minute ago for ``days`` days."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def issue(ca_key, ca_cert, common_name: str, *, hosts: Iterable[str] = (), client: bool = False,
          days: int = DAYS, not_before: Optional[datetime.datetime] = None,
          not_after: Optional[datetime.datetime] = None):
    """A certificate signed by the CA: ``(key, certificate)``. ``hosts``: a server
    certificate for these names and IPs; ``client``: a client certificate (mutual TLS).
    ``not_before``/``not_after`` override the validity (tests make expired ones)."""
    hosts = list(dict.fromkeys(h for h in hosts if h))
    if not hosts and not client:
        raise CertError("a server certificate needs at least one host name or IP")
    key = _new_key()
    now = _now()
    start = not_before or now - datetime.timedelta(minutes=1)
    end = not_after or now + datetime.timedelta(days=days)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # (whatever the umask)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_key(path: Path, key) -> None:
    _write(Path(path), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), 0o600)


def write_cert(path: Path, cert) -> None:
    _write(Path(path), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_cert(path: Path):
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def check_name(name: str) -> str:
    """A node name that names files (``clients/<name>.pem``): letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CertError(f"node name {name!r} cannot name a certificate file: use 1-128 letters, digits, "
                        "'.', '_' or '-', not starting with '.' or '-'")
    return name


def client_paths(directory: Path, name: str) -> tuple[Path, Path]:
    d = Path(directory) / "clients"
    return d / f"{check_name(name)}.pem", d / f"{name}.key"


def covers(cert, hosts: Iterable[str], min_days: float = 1.0) -> bool:
    """Whether ``cert`` is valid for at least ``min_days`` more days and names every host."""
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=min_days):
        return False
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = set(names.get_values_for_type(x509.DNSName)) | {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    return all(str(_san(h).value) in have for h in hosts if h)


def write_bundle(directory: Path, hosts: Iterable[str] = (), nodes: Iterable[str] = (), days: int = DAYS) -> Path:
    """Make or extend the bundle in ``directory``: a CA (kept if ``ca.pem``/``ca.key`` are
    there and valid for a day more), a server certificate for ``LOCAL_HOSTS`` + ``hosts``
    (remade when it does not cover them), and a client certificate for each node in
    ``nodes`` that has none yet. Not safe against concurrent writers: callers lock."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    hosts = list(dict.fromkeys([*LOCAL_HOSTS, *hosts]))
    nodes = [check_name(n) for n in nodes]
    ca_key = ca_cert = None
    if (d / "ca.pem").exists() and not (d / "ca.key").exists():
        raise CertError(f"{d} has ca.pem but no ca.key: certificates of that CA cannot be issued here "
                        "(copy its ca.key in, or use an empty folder for a new CA)")
    if (d / "ca.pem").exists():
        ca_cert = load_cert(d / "ca.pem")
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        if ca_cert.not_valid_after_utc - _now() < datetime.timedelta(days=1):
            ca_key = ca_cert = None
    fresh = ca_cert is None
    if fresh:
        ca_key, ca_cert = make_ca(days=days)
        write_key(d / "ca.key", ca_key)
        write_cert(d / "ca.pem", ca_cert)
    if fresh or not (d / "server.pem").exists() or not covers(load_cert(d / "server.pem"), hosts):
        key, cert = issue(ca_key, ca_cert, "byzfed orchestrator", hosts=hosts, days=days)
        write_key(d / "server.key", key)
        write_cert(d / "server.pem", cert)
    for name in nodes:
        pem, kpath = client_paths(d, name)
        if fresh or not pem.exists() or not kpath.exists():
            key, cert = issue(ca_key, ca_cert, name, client=True, days=days)
            write_key(kpath, key)
            write_cert(pem, cert)
    return d
