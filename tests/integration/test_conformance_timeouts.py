"""Listener timeouts from meshgate.yaml, through Envoy and the sidecar: a client that sends
its headers too slowly (`request_headers_timeout`), and one whose body does not arrive in
time (`request_timeout`). Envoy's answer is observed, the sidecar's must match it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.conformance import (
    ConformancePlanes,
    ConformanceUpstream,
    ListenerSpec,
    Request,
)
from tests.support.stack import PLUGINS

EXAMPLES = PLUGINS / "examples"

pytestmark = [pytest.mark.envoy]


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory,
           upstream: ConformanceUpstream) -> Iterator[ConformancePlanes]:
    path = tmp_path_factory.mktemp("conformance-timeouts")
    listeners = [ListenerSpec("timed", [], request_timeout="1s",
                              request_headers_timeout="500ms"),
                 ListenerSpec("timed-callout", ["http-auth-random"], request_timeout="1s")]
    # A plugin that pauses each request on an HTTP callout (the proxy-wasm 0.2.0 example).
    plugins = [{"name": "http-auth-random", "wasm": str(EXAMPLES / "http_auth_random.wasm")}]
    with ConformancePlanes(path, listeners, plugins, upstream,
                           extra_clusters={"httpbin": upstream.port}) as both:
        yield both


def slow_client(url: str, first: bytes, wait_s: float) -> tuple[bytes, bool]:
    """Send `first`, then nothing for up to `wait_s`: what came back, and whether the
    connection was closed by the proxy."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(first)
        sock.settimeout(0.2)
        got, closed, end = b"", False, time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                closed = True
                break
            got += data
        return got, closed


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def both(planes: ConformancePlanes, first: bytes, wait_s: float) -> dict[str, tuple[bytes, bool]]:
    return {"envoy": slow_client(planes.envoy_url("timed"), first, wait_s),
            "sidecar": slow_client(planes.sidecar_url("timed"), first, wait_s)}


def test_slow_headers_get_408_and_a_closed_connection(planes: ConformancePlanes) -> None:
    started = time.monotonic()
    seen = both(planes, b"GET /slow HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n", 4.0)
    assert time.monotonic() - started < 7  # each answered near its 0.5 s limit
    for plane, (reply, closed) in seen.items():
        assert status(reply) == 408, (plane, reply, planes.logs())
        assert reply.endswith(b"\r\n\r\nrequest header timeout"), (plane, reply)
        assert closed, plane


def test_headers_in_time_are_served(planes: ConformancePlanes) -> None:
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for plane, (reply, _) in both(planes, request, 3.0).items():
        assert status(reply) == 200, (plane, reply)


def test_a_body_not_in_by_the_request_timeout_gets_408(planes: ConformancePlanes) -> None:
    request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
    for plane, (reply, closed) in both(planes, request, 4.0).items():
        assert status(reply) == 408, (plane, reply, planes.logs())
        assert reply.endswith(b"\r\n\r\nrequest timeout"), (plane, reply)
        # The rest of the body must not be read as a next request: the connection goes.
        assert closed, plane


def test_a_plugin_still_deciding_at_the_request_timeout_gets_504(
        planes: ConformancePlanes, upstream: ConformanceUpstream) -> None:
    # The whole (bodyless) request is in; the wait is the proxy's: Envoy answers 504.
    upstream.next_bytes, upstream.bytes_delay_s = b"\x02", 3.0  # allowed, but late
    try:
        envoy, sidecar = planes.send_raw("timed-callout", Request("/late"))
    finally:
        upstream.next_bytes, upstream.bytes_delay_s = None, 0.0
    assert envoy.status == sidecar.status == 504, (envoy, sidecar, planes.logs())
    assert envoy.body == sidecar.body == b"request timeout"
    # Both run the plugin's response callbacks over their own reply (the example adds
    # `powered-by` to every response).
    assert envoy.headers.get("powered-by") == sidecar.headers.get("powered-by") == "proxy-wasm"
