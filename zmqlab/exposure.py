"""Protected mode: a node binds only this host unless it is told otherwise.

Nothing authenticates a peer yet, so an endpoint other hosts can reach lets anyone in. As Redis'
protected mode does, a bind that is not loopback (``127.0.0.0/8``, ``::1``) or local
(``inproc://``, ``ipc://``) is refused unless the caller accepted it: ``insecure`` (open to
anyone, on purpose) or ``curve`` (peers authenticate; the CURVE options will pass it).
"""

from __future__ import annotations

import ipaddress
import socket

from zmqlab.errors import ConfigError

LOCAL_TRANSPORTS = frozenset({"inproc", "ipc"})
HOST_TRANSPORTS = frozenset({"tcp", "udp", "ws", "wss"})  # transport://host:port[/path]


def check_exposure(endpoint: str, *, insecure: bool, curve: bool = False,
                   what: str = "endpoint") -> None:
    """Raise ConfigError, in one line, when binding ``endpoint`` would let other hosts in and
    neither ``insecure`` nor ``curve`` accepts that: nobody gets in uninvited."""
    if insecure or curve:
        return  # no name lookups for a bind the caller already accepted
    why = exposure(endpoint)
    if why is not None:
        raise ConfigError(f"refusing to bind {what} {endpoint}: {why}, and nothing "
                          "authenticates peers yet (no CURVE); bind 127.0.0.1, or pass "
                          "--insecure (insecure=True) to let anyone in")


def exposure(endpoint: str) -> str | None:
    """Why other hosts could reach a socket bound to ``endpoint``, or None if they cannot."""
    transport, _, address = endpoint.partition("://")
    transport = transport.lower()
    if transport in LOCAL_TRANSPORTS:
        return None
    if transport not in HOST_TRANSPORTS:
        return f"{transport}:// reaches the network"
    host = address.split("/", 1)[0].rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "*":
        return "* is every interface"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return _name_exposure(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return f"{host} is every interface"
    return None if ip.is_loopback else f"{host} is not a loopback address"


def _name_exposure(host: str) -> str | None:
    """A name, resolved as ZeroMQ does for a bind: a network interface first, then a host."""
    if host in _interface_names():
        return f"{host} is a network interface"  # even lo may carry other addresses
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"{host} does not resolve, so it may not be loopback"
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]
        if not ipaddress.ip_address(address).is_loopback:
            return f"{host} resolves to {address}, not a loopback address"
    return None if infos else f"{host} does not resolve, so it may not be loopback"


def _interface_names() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()
