"""TLS credentials for every gRPC channel and server of a run (``[security]`` of a scenario).

Shared by the orchestrator, the node and the Byzantine support, so it lives here and
imports nothing of ours: it reads PEM files and hands them to gRPC's own TLS
(``grpc.ssl_channel_credentials`` / ``grpc.ssl_server_credentials``); nothing here
does cryptography. Certificates are made by :mod:`proto.certs`.

A node process learns where its files are from ``--tls-ca/--tls-cert/--tls-key`` or
the environment (:data:`ENV_CA`, :data:`ENV_CERT`, :data:`ENV_KEY`); :func:`configure`
makes that the process default, which :func:`channel` uses for every channel the node
opens (the federation, its ingest rank, the collusion service, the adversary view).
No CA configured: plaintext channels, as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import grpc

ENV_CA, ENV_CERT, ENV_KEY = "BYZFED_TLS_CA", "BYZFED_TLS_CERT", "BYZFED_TLS_KEY"


class TlsError(ValueError):
    """A TLS file is missing or unreadable; the message names it."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"TLS {what} {path!r} cannot be read: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca``) and, for mutual TLS, what it presents (``cert``, ``key``)."""

    ca: str
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise TlsError("a TLS client certificate needs its key and a key its certificate "
                           f"(cert={self.cert!r}, key={self.key!r})")

    def credentials(self) -> grpc.ChannelCredentials:
        cert = _read(self.cert, "client certificate") if self.cert else None
        key = _read(self.key, "client key") if self.key else None
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca, "CA certificate"),
                                            private_key=key, certificate_chain=cert)

    def env(self) -> dict[str, str]:
        """The environment that makes a child process use these files (:meth:`from_env`)."""
        out = {ENV_CA: self.ca}
        if self.cert:
            out.update({ENV_CERT: self.cert, ENV_KEY: self.key})
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Optional["ClientTls"]:
        ca = env.get(ENV_CA, "")
        return cls(ca, env.get(ENV_CERT, ""), env.get(ENV_KEY, "")) if ca else None


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key; ``ca`` and ``require_client_auth`` for mutual TLS
    (a client must present a certificate that ``ca`` signed, else the handshake fails)."""

    cert: str
    key: str
    ca: str = ""
    require_client_auth: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "server key"), _read(self.cert, "server certificate"))
        if self.require_client_auth and not self.ca:
            raise TlsError("mutual TLS needs the CA certificate that signs the client certificates")
        roots = _read(self.ca, "CA certificate") if self.require_client_auth else None
        return grpc.ssl_server_credentials([pair], root_certificates=roots,
                                           require_client_auth=self.require_client_auth)


def add_port(server, address: str, tls: Optional[ServerTls]) -> int:
    """``server.add_secure_port`` with ``tls``'s credentials, or ``add_insecure_port`` for None
    (a ``grpc.Server`` or a ``grpc.aio.Server``); the bound port, 0 when it could not bind."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())


_UNSET = object()
_default: Optional[ClientTls] = None
_configured = False


def configure(tls: Optional[ClientTls]) -> None:
    """Make ``tls`` this process's default for :func:`channel` (a node does at start-up)."""
    global _default, _configured
    _default, _configured = tls, True


def default() -> Optional[ClientTls]:
    """The process default: what :func:`configure` set, else the environment, else None."""
    return _default if _configured else ClientTls.from_env()


def channel(address: str, options: Sequence[tuple[str, int]] = (), tls=_UNSET) -> grpc.Channel:
    """A channel to ``address``: TLS with ``tls`` (default: :func:`default`), plaintext for None."""
    tls = default() if tls is _UNSET else tls
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=list(options))


def channel_credentials(tls=_UNSET) -> Optional[grpc.ChannelCredentials]:
    """``tls``'s (default: :func:`default`) channel credentials, or None for plaintext."""
    tls = default() if tls is _UNSET else tls
    return None if tls is None else tls.credentials()
