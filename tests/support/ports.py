"""Free loopback ports for servers the tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
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
