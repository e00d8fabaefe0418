"""A run's ``[security]``: which certificate files its servers and its nodes use.

``security.tls`` (or ``mtls``) on: the orchestrator's federation service, every
aggregation rank's ingest endpoint (each calls ``servicer.serve``, which asks
:func:`server_tls`), the collusion service and the adversary view listen with TLS,
and the launcher tells each node its CA (and, with ``mtls``, its own certificate and
key) through ``--tls-ca/--tls-cert/--tls-key`` (:func:`node_tls`). The files come from
``security.certs`` (a bundle of ``./launch.sh certs``) or, when that is '', from a
throwaway bundle made in ``RUN_DIR/certs`` on first use (:func:`bundle`): every
process of a run on this machine shares it, made once under a file lock.
"""
from __future__ import annotations

import fcntl
import socket
from pathlib import Path
from typing import Optional

from proto.tls import ClientTls, ServerTls

from .addresses import is_wildcard
from .scenario import Scenario


def server_hosts(s: Scenario, extra: tuple[str, ...] = ()) -> list[str]:
    """The names and IPs a generated server certificate covers: loopback (``proto.certs``
    adds it), this machine's host name and IPv4 addresses, the bind host when concrete,
    ``federation.advertise_host`` and ``extra``."""
    hosts = [socket.gethostname()]
    try:
        from .interfaces import interfaces

        hosts += [str(iface.ip) for _, iface in interfaces()]
    except OSError:
        pass
    fed = s.federation
    if fed.host and not is_wildcard(fed.host):
        hosts.append(fed.host)
    hosts += [fed.advertise_host, *extra]
    return [h for h in dict.fromkeys(hosts) if h]


def bundle(s: Scenario, run_dir: Path) -> Optional[Path]:
    """The run's certificate folder, None when TLS is off. With ``security.certs`` set that
    folder, checked; else ``RUN_DIR/certs``, made (or completed: a client certificate per
    node for ``mtls``) under a lock, so ranks and the runner starting at once share one CA."""
    sec = s.security
    if not sec.enabled:
        return None
    names = [n for n, _ in s.node_roles()] if sec.mtls else []
    if sec.certs:
        d = Path(sec.certs)  # (a node machine needs only ca.pem and, for mtls, its clients/<name>.*)
        if not (d / "ca.pem").is_file():
            raise FileNotFoundError(f"security.certs = {sec.certs!r}: no {d / 'ca.pem'} "
                                    "(make the folder with ./launch.sh certs DIR)")
        return d
    from proto.certs import write_bundle  # (cryptography: only where certificates are made)

    d = Path(run_dir) / "certs"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            write_bundle(d, server_hosts(s), names)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return d


def server_tls(s: Scenario, run_dir: Path) -> Optional[ServerTls]:
    """What the run's servers listen with (None: plaintext)."""
    d = bundle(s, run_dir)
    if d is None:
        return None
    missing = [str(p) for p in (d / "server.pem", d / "server.key") if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"security.certs = {s.security.certs!r}: missing {', '.join(missing)} "
                                "(the orchestrator's certificate: ./launch.sh certs DIR --host H)")
    return ServerTls(str(d / "server.pem"), str(d / "server.key"), str(d / "ca.pem"),
                     require_client_auth=s.security.mtls)


def node_tls(s: Scenario, certs: Optional[Path], name: str) -> Optional[ClientTls]:
    """What node ``name`` trusts and presents, from the run's :func:`bundle` ``certs``
    (None: plaintext)."""
    d = certs
    if d is None or not s.security.enabled:
        return None
    if not s.security.mtls:
        return ClientTls(str(d / "ca.pem"))
    from proto.certs import client_paths

    pem, key = client_paths(d, name)
    if not (pem.is_file() and key.is_file()):
        raise FileNotFoundError(f"security.mtls: no client certificate for node {name!r} in {d} "
                                f"(make one with ./launch.sh certs {d} --nodes {name})")
    return ClientTls(str(d / "ca.pem"), str(pem), str(key))
