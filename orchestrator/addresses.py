"""Addresses the orchestrator hands out: every one must be reachable from where its
receiver is (an advertised host, never a wildcard bind address). Pure functions:
no gRPC here, so scenario validation can use them.
"""
from __future__ import annotations

import ipaddress


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is a bind-to-every-interface address (0.0.0.0, ::, '', ...): fine to
    listen on, never an address another machine can dial (see :func:`advertised_address`)."""
    h = host.strip()
    if h in ("", "*", "0.0.0.0", "::", "[::]"):
        return True
    try:
        return ipaddress.ip_address(h.strip("[]")).is_unspecified
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC targets spell it (an IPv6 literal in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def advertised_address(bind_host: str, port: int, advertise_host: str = "") -> str:
    """The address the orchestrator hands to nodes for a service it listens on at
    ``bind_host:port``; it must be reachable from where the nodes are.

    * an explicit ``advertise_host`` (``federation.advertise_host``, ``--advertise-host``):
      ``advertise_host:port``;
    * a wildcard bind address (0.0.0.0, ::) and no advertise host: ``""``, which tells a
      node to use the host it joined the orchestrator on (for the federation service
      itself: the very channel it joined on; see ``fednode.client.resolve_address``);
    * a concrete bind address: ``bind_host:port`` as is.
    """
    if advertise_host:
        return host_port(advertise_host, port)
    if is_wildcard(bind_host):
        return ""
    return host_port(bind_host, port)
