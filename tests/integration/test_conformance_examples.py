"""Conformance: the examples shipped by the crates.io package proxy-wasm 0.2.0, each run by
real Envoy 1.40 and by meshgate's sidecar, both configured by meshgate's control server;
every request goes to both and the replies must match (see `tests.support.conformance`
for what the comparison ignores and why).

What each example does (from its source in the crate):
  - http_headers: `:path == "/hello"` -> local reply 200 `Hello, World!\\n` with headers
    `Hello: World`, `Powered-By: proxy-wasm`; anything else continues.
  - http_body: drops the response's content-length; once the whole body is there, a body
    containing "secret" becomes `Original message body (<n> bytes) redacted.`.
  - http_config: adds `custom-header: <plugin configuration>` to every response.
  - http_auth_random: `dispatch_http_call("httpbin", GET /bytes/1)`; an even first byte
    resumes the request, otherwise a local 403 `Access forbidden.\\n`; every response gets
    `Powered-By: proxy-wasm`.
  - hello_world: a root context only (logs at VM start, ticks every 5 s); it defines no
    HTTP context, so the SDK panics when a stream context is created (Envoy's trace:
    `proxy_on_context_create failed: Uncaught RuntimeError: unreachable`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.conformance import (
    ConformancePlanes,
    ConformanceUpstream,
    ListenerSpec,
    Observed,
    Request,
    assert_same,
)
from tests.support.stack import PLUGINS

EXAMPLES = PLUGINS / "examples"
NAMES = ("hello_world", "http_auth_random", "http_headers", "http_body", "http_config")

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not all((EXAMPLES / f"{n}.wasm").exists() for n in NAMES),
                       reason="proxy-wasm examples not built (make setup)"),
]

HEADER_CONFIG = "conformance-from-plugin-config"


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory,
           upstream: ConformanceUpstream) -> Iterator[ConformancePlanes]:
    def example(name: str, **extra: object) -> dict[str, object]:
        return {"name": name.replace("_", "-"), "wasm": str(EXAMPLES / f"{name}.wasm"), **extra}

    plugins = [example("http_headers"), example("http_body"),
               example("http_config", config=HEADER_CONFIG),
               example("http_auth_random"), example("hello_world")]
    listeners = [ListenerSpec(str(p["name"]), [str(p["name"])]) for p in plugins]
    path: Path = tmp_path_factory.mktemp("conformance-examples")
    with ConformancePlanes(path, listeners, plugins, upstream,
                           extra_clusters={"httpbin": upstream.port},
                           envoy_args=("--component-log-level", "wasm:info")) as both:
        yield both


def same(planes: ConformancePlanes, listener: str, request: Request) -> Observed:
    envoy, sidecar = planes.send(listener, request)
    assert_same(envoy, sidecar, f"{listener} {request.method} {request.path}")
    return envoy


# -- http_headers ---------------------------------------------------------------------

def test_http_headers_local_reply_on_hello(planes: ConformancePlanes) -> None:
    reply = same(planes, "http-headers", Request("/hello"))
    assert reply.status == 200
    assert reply.body == b"Hello, World!\n"
    assert reply.headers["hello"] == "World"
    assert reply.headers["powered-by"] == "proxy-wasm"


@pytest.mark.parametrize("request_", [
    Request("/hello/more"),
    Request("/hello?name=x"),
    Request("/other", headers={"x-custom": "v"}),
    Request("/submit", method="POST", headers={"content-type": "text/plain"}, body=b"payload"),
], ids=["longer-path", "query-is-part-of-path", "plain-get", "post-with-body"])
def test_http_headers_other_paths_reach_the_upstream(planes: ConformancePlanes,
                                                     request_: Request) -> None:
    reply = same(planes, "http-headers", request_)
    assert reply.status == 200
    assert "powered-by" not in reply.headers
    echoed = reply.json()
    assert (echoed["method"], echoed["path"]) == (request_.method, request_.path)


def test_http_headers_post_to_hello_is_answered_locally(planes: ConformancePlanes) -> None:
    reply = same(planes, "http-headers", Request("/hello", method="POST", body=b"ignored"))
    assert (reply.status, reply.body) == (200, b"Hello, World!\n")


# -- http_body ------------------------------------------------------------------------

def test_http_body_redacts_a_secret(planes: ConformancePlanes) -> None:
    reply = same(planes, "http-body", Request("/say/the-secret-word"))
    assert reply.body == b"Original message body (16 bytes) redacted."
    assert reply.headers["content-type"] == "text/plain"


def test_http_body_leaves_other_bodies_alone(planes: ConformancePlanes) -> None:
    reply = same(planes, "http-body", Request("/say/nothing-to-hide?repeat=3"))
    assert reply.body == b"nothing-to-hide\n" * 3


def test_http_body_redacts_a_body_that_arrives_in_many_chunks(
        planes: ConformancePlanes) -> None:
    # ~260 KiB: several reads on either plane, buffered whole before the plugin decides.
    reply = same(planes, "http-body", Request("/say/secret-in-a-long-body?repeat=12000"))
    size = len(b"secret-in-a-long-body\n") * 12000
    assert reply.body == f"Original message body ({size} bytes) redacted.".encode()


def test_http_body_passes_upstream_errors_through(planes: ConformancePlanes) -> None:
    reply = same(planes, "http-body", Request("/status/404"))
    assert (reply.status, reply.json()) == (404, {"status": 404})


# -- http_config ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/status/503", "/say/secret"])
def test_http_config_header_comes_from_the_plugin_configuration(planes: ConformancePlanes,
                                                                path: str) -> None:
    reply = same(planes, "http-config", Request(path))
    assert reply.headers["custom-header"] == HEADER_CONFIG


# -- http_auth_random -----------------------------------------------------------------

@pytest.mark.parametrize(("first_byte", "status"), [(b"\x02", 200), (b"\x00", 200),
                                                    (b"\x03", 403), (b"\xff", 403)])
def test_http_auth_random_decides_on_the_callout_byte(planes: ConformancePlanes,
                                                      upstream: ConformanceUpstream,
                                                      first_byte: bytes, status: int) -> None:
    upstream.next_bytes = first_byte
    before = len(upstream.seen)
    try:
        reply = same(planes, "http-auth-random", Request("/protected"))
    finally:
        upstream.next_bytes = None
    assert reply.status == status
    assert reply.headers["powered-by"] == "proxy-wasm"
    if status == 403:
        assert reply.body == b"Access forbidden.\n"
    else:
        assert reply.json()["path"] == "/protected"
    # Each plane made the callout the example's source describes.
    callouts = [h for h in upstream.seen[before:] if h.get("host") == "httpbin.org"]
    assert len(callouts) == 2, upstream.seen[before:]


def test_http_auth_random_with_random_bytes_has_the_same_shape(
        planes: ConformancePlanes) -> None:
    seen: dict[str, set[int]] = {"envoy": set(), "sidecar": set()}
    for _ in range(8):
        envoy, sidecar = planes.send("http-auth-random", Request("/protected"))
        for plane, reply in (("envoy", envoy), ("sidecar", sidecar)):
            assert reply.status in {200, 403}, (plane, reply)
            seen[plane].add(reply.status)
            assert reply.headers["powered-by"] == "proxy-wasm", (plane, reply)
            if reply.status == 403:
                assert reply.body == b"Access forbidden.\n", (plane, reply)
                assert reply.headers["content-type"] == "text/plain", (plane, reply)
            else:
                assert reply.json()["path"] == "/protected", (plane, reply)
    assert seen["envoy"] and seen["sidecar"]


# -- hello_world ----------------------------------------------------------------------

def test_hello_world_ticks_on_both_planes(planes: ConformancePlanes) -> None:
    tick = re.compile(r"It's .+, your lucky number is \d+\.")
    deadline = time.monotonic() + 15
    envoy_log = sidecar_log = ""
    while time.monotonic() < deadline:
        assert planes.envoy is not None and planes.sidecar is not None
        envoy_log, sidecar_log = planes.envoy.log(), planes.sidecar.log()
        if tick.search(envoy_log) and tick.search(sidecar_log):
            break
        time.sleep(0.5)
    assert "Hello, World!" in envoy_log and "Hello, World!" in sidecar_log
    assert tick.search(envoy_log), "no tick in Envoy's log"
    assert tick.search(sidecar_log), "no tick in the sidecar's log"


def test_hello_world_without_http_context_fails_closed_alike(
        planes: ConformancePlanes) -> None:
    # Observed, not assumed: the example cannot serve HTTP streams (its root context has
    # no ContextType), so both planes apply fail-closed: 503, empty body, every time.
    for _ in range(2):
        reply = same(planes, "hello-world", Request("/"))
        assert (reply.status, reply.body) == (503, b"")
