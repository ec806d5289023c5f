"""Checks of the daemon address a viewer is given, before and after it waits on it.

ZeroMQ never fails a ``connect``: a port past 65535, a misspelt host or a port where
something else listens all look the same to the viewer, a daemon that never answers.
`check_endpoint` rejects what is certainly wrong at once; `listening` tells a port where
nothing listens from one where a program that is not a livestain daemon (or a daemon
with other ``--keys``) does, so the "no daemon" message can say which.
"""

from __future__ import annotations

import socket

#: How long `listening` waits for a TCP connection.
PROBE_TIMEOUT_S = 1.0


def split_tcp(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of ``tcp://host:port`` (IPv6 hosts in brackets); None for other forms."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        number = int(port)
    except ValueError:
        return None
    return (host.strip("[]"), number) if sep and host else None


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError, worded for ``--connect``/``--port``, if ``endpoint`` cannot be
    a daemon: a port out of range or a host name that does not exist.

    Only a definite "no such host" counts; a slow or failing DNS server is left to
    ZeroMQ, which keeps retrying, so a viewer started before the network is up still works.
    """
    parts = split_tcp(endpoint)
    if parts is None:
        return
    host, port = parts
    if not 0 < port < 65536:
        raise ValueError(f"port {port} of {endpoint} is out of range (1-65535): check --port "
                         f"(the daemon uses it and the next three, so at most 65532)")
    if host in ("*", "localhost") or _is_address(host):
        return
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_NONAME:
            raise ValueError(f"unknown host {host!r} in {endpoint}: check --connect") from None


def _is_address(host: str) -> bool:
    """True for a numeric IPv4/IPv6 address (nothing to resolve)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def listening(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """Whether anything accepts TCP connections at ``endpoint``: True, False (refused),
    or None when it cannot be told (not tcp, no route, timeout)."""
    parts = split_tcp(endpoint)
    if parts is None:
        return None
    try:
        with socket.create_connection(parts, timeout=timeout_s):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return None
