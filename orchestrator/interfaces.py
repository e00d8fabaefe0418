"""This machine's IPv4 interfaces, and which of its addresses the other machines of an
``mpirun`` job reach it at (what rank 0 advertises to nodes and what an aggregation rank
advertises for its ingest endpoint and the rendezvous).

The choice, in order: an address inside a subnet or on an interface that the job pins for
MPI traffic (``btl_tcp_if_include`` / ``oob_tcp_if_include``, which ``mpirun --mca``
exports to every rank as ``OMPI_MCA_*``), so byzfed's traffic takes the network MPI takes;
else the address whose subnet holds the most of the other hosts' addresses; else the source
address of this machine's route towards another host (a UDP ``connect``, which sends
nothing); else the host name. Loopback never, since another machine cannot dial it.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from typing import Mapping, Optional

Interface = tuple[str, ipaddress.IPv4Interface]

SIOCGIFADDR, SIOCGIFNETMASK = 0x8915, 0x891B
PIN_VARIABLES = ("OMPI_MCA_btl_tcp_if_include", "OMPI_MCA_oob_tcp_if_include", "PRTE_MCA_oob_tcp_if_include")


def interfaces() -> list[Interface]:
    """``(name, address/prefix)`` of each interface with an IPv4 address (its primary one)."""
    out: list[Interface] = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFNETMASK, req)[20:24])
            except OSError:  # no IPv4 address on it
                continue
            out.append((name, ipaddress.IPv4Interface(f"{addr}/{mask}")))
    finally:
        s.close()
    return out


def pinned(env: Mapping[str, str] = os.environ) -> list[str]:
    """Subnets (``10.1.2.0/24``) and interface names the job pins MPI's TCP traffic to."""
    out: list[str] = []
    for var in PIN_VARIABLES:
        for item in env.get(var, "").split(","):
            if item.strip() and item.strip() not in out:
                out.append(item.strip())
    return out


def _matches(iface: Interface, pin: str) -> bool:
    name, addr = iface
    if "/" not in pin:
        return name == pin
    try:
        return addr.ip in ipaddress.ip_network(pin, strict=False)
    except ValueError:
        return False


def reachable_address(peers: list[str], mine: Optional[list[Interface]] = None,
                      pins: Optional[list[str]] = None) -> str:
    """The address of this machine that the hosts owning ``peers`` (their IPv4 addresses)
    reach it at; see the module docstring for the order of choices."""
    mine = interfaces() if mine is None else mine
    pins = pinned() if pins is None else pins
    usable = [i for i in mine if not i[1].ip.is_loopback]
    for pin in pins:
        for iface in usable:
            if _matches(iface, pin):
                return str(iface[1].ip)
    own = {str(i[1].ip) for i in mine}
    others = [ipaddress.IPv4Address(p) for p in peers if p not in own]  # 172.17.0.1 on every machine is no peer
    best = max(usable, key=lambda i: sum(p in i[1].network for p in others), default=None)
    if best is not None and any(p in best[1].network for p in others):
        return str(best[1].ip)
    for peer in others:
        if peer.is_loopback:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((str(peer), 9))
                return s.getsockname()[0]
            except OSError:
                continue
    return socket.gethostname()


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (bound and released: the caller binds it right away)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]
