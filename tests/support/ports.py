"""Free loopback ports for servers the tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: How far below the kernel's ephemeral range the ports are drawn from.
SPAN = 12_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port free now, drawn below the kernel's ephemeral range. A port the
    kernel hands out for `bind(0)` comes from that range, where the tests' own client
    connections take their local ports too: one of them could take a port a server is
    configured with but has not bound yet (a sidecar then NACKs its listener with
    "address already in use")."""
    high = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, high - SPAN), high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range is crowded: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def distinct_free_ports(count: int, avoid: set[int]) -> list[int]:
    """`free_port()` may hand out a port twice (it is free again once probed): `count`
    different ones, none in `avoid` (ports a config names but nothing has bound yet)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in avoid and port not in ports:
            ports.append(port)
    return ports
