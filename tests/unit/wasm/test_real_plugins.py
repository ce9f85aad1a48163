"""The host against real Rust plugins: the proxy-wasm 0.2.0 SDK examples and meshgate's own.

Built by `bash plugins/build.sh build/plugins`; each test skips when its binary is absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from meshgate.gateway.wasm import (
    CONTINUE,
    HeaderMap,
    HostServices,
    LocalReply,
    PluginHost,
    PluginSpec,
    StreamInfo,
)

BUILD = Path(__file__).resolve().parents[3] / "build" / "plugins"


def binary(name: str) -> bytes:
    path = BUILD / name
    if not path.exists():
        pytest.skip(f"{path} not built (bash plugins/build.sh build/plugins)")
    return path.read_bytes()


def get(path: str = "/", **extra: str) -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", path), (":authority", "svc"),
                      (":scheme", "http"), *extra.items()])


async def start(services: HostServices, name: str, file: str, conf: bytes = b"",
                **spec) -> PluginHost:
    return await PluginHost.create(PluginSpec(name, binary(file), conf, **spec), services)


class Httpbin:
    """Stands in for the `httpbin` cluster http_auth_random calls."""

    def __init__(self, byte: bytes) -> None:
        self.byte = byte
        self.calls: list[list[tuple[str, str]]] = []

    def has_cluster(self, name: str) -> bool:
        return name == "httpbin"

    async def __call__(self, cluster, headers, body, trailers, timeout_s):
        self.calls.append(headers)
        await asyncio.sleep(0)
        return [(":status", "200")], self.byte, []


async def test_http_headers_example_answers_hello_locally(services):
    host = await start(services, "http_headers", "examples/http_headers.wasm")
    action = await host.new_stream().request_headers(get("/hello"), True)
    assert action == LocalReply(200, [("hello", "World"), ("powered-by", "proxy-wasm"),
                                      ("content-type", "text/plain")], b"Hello, World!\n", "")
    assert await host.new_stream().request_headers(get("/other"), True) == CONTINUE
    await host.close()


async def test_http_config_example_adds_its_configuration_as_a_header(services):
    host = await start(services, "http_config", "examples/http_config.wasm", b"my-value")
    stream = host.new_stream()
    await stream.request_headers(get(), True)
    response = HeaderMap([(":status", "200")])
    assert await stream.response_headers(response, True) == CONTINUE
    assert response.get("custom-header") == "my-value"
    stream.finish()


async def test_http_body_example_rewrites_the_response_body(services):
    host = await start(services, "http_body", "examples/http_body.wasm")
    stream = host.new_stream()
    await stream.request_headers(get(), True)
    await stream.response_headers(HeaderMap([(":status", "200")]), False)
    body = bytearray(b"hello secret world")
    assert await stream.response_body(body, True) == CONTINUE
    assert body == b"Original message body (18 bytes) redacted."


@pytest.mark.parametrize(("byte", "allowed"), [(b"\x02", True), (b"\x01", False)])
async def test_http_auth_random_example_pauses_on_its_call(services, byte, allowed):
    httpbin = Httpbin(byte)
    services.http_dispatcher = httpbin
    host = await start(services, "http_auth_random", "examples/http_auth_random.wasm")
    action = await host.new_stream().request_headers(get(), True)
    assert httpbin.calls[0][:2] == [(":method", "GET"), (":path", "/bytes/1")]
    if allowed:
        assert action == CONTINUE
    else:
        assert action == LocalReply(403, [("powered-by", "proxy-wasm"),
                                          ("content-type", "text/plain")],
                                    b"Access forbidden.\n", "")


async def test_http_auth_random_without_the_cluster_traps_and_fails_closed(services):
    host = await start(services, "http_auth_random", "examples/http_auth_random.wasm")
    action = await host.new_stream().request_headers(get(), True)
    assert action == LocalReply(503, [], b"", "wasm_fail_stream")


API_KEY = "test-key-123"


def auth_config() -> bytes:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    return json.dumps({"api_keys": {"header": "x-api-key",
                                    "keys": [{"id": "ci", "sha256": digest}]}}).encode()


async def test_auth_plugin_denies_without_key_and_allows_with_it(services):
    host = await start(services, "auth", "auth.wasm", auth_config(), root_id="auth",
                       vm_id="auth")
    denied = await host.new_stream().request_headers(get("/api"), True)
    assert isinstance(denied, LocalReply) and denied.status == 401
    allowed = await host.new_stream().request_headers(get("/api", **{"x-api-key": API_KEY}),
                                                      True)
    assert allowed == CONTINUE


async def test_rate_limit_plugin_limits_per_client(services):
    conf = json.dumps({"rules": [{"name": "tiny", "rate": {"tokens": 2}}]}).encode()
    host = await start(services, "rate_limit", "rate_limit.wasm", conf, root_id="rate_limit",
                       vm_id="rate_limit")
    statuses = []
    for _ in range(4):
        stream = host.new_stream(StreamInfo(source_address="10.0.0.9:5000"))
        action = await stream.request_headers(get("/api"), True)
        statuses.append(action.status if isinstance(action, LocalReply) else 200)
        stream.finish()
    assert statuses[:2] == [200, 200]
    assert statuses[2:] == [429, 429]


def _counted_tracing(services: HostServices, provider):
    """The sidecar's wasi:tracing functions, each call counted by name."""
    from meshgate.otel import WasiTracing

    calls: dict[str, int] = {}

    def counted(name, fn):
        def call(args, info):
            calls[name] = calls.get(name, 0) + 1
            return fn(args, info)
        return call

    tracing = WasiTracing(provider, event_window_s=60)
    services.foreign_functions.update({k: counted(k, f) for k, f in tracing.functions().items()})
    return tracing, calls


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def _auth_requests(services: HostServices, keys: tuple[str, ...]) -> list[int]:
    host = await start(services, "auth", "auth.wasm", auth_config(), root_id="auth",
                       vm_id="auth")
    statuses = []
    for key in keys:
        stream = host.new_stream(StreamInfo(traceparent=TRACEPARENT))
        action = await stream.request_headers(get("/api", **{"x-api-key": key}), True)
        statuses.append(action.status if isinstance(action, LocalReply) else 200)
        stream.finish()
    await host.close()
    return statuses


async def test_auth_plugin_spans_reach_the_exporter_as_children_of_the_request(services):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshgate.otel import setup_tracing

    exporter = InMemorySpanExporter()
    tracing, calls = _counted_tracing(
        services, setup_tracing("test", processor=SimpleSpanProcessor(exporter)))
    assert await _auth_requests(services, (API_KEY, "wrong")) == [200, 401]
    tracing.flush()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["meshgate.auth"] * 2
    assert [s.attributes["auth.outcome"] for s in spans] == ["allowed", "unauthenticated"]
    assert all(f"{s.parent.span_id:016x}" == TRACEPARENT.split("-")[2] for s in spans)
    assert calls["wasi:tracing/record-span"] == 2


async def test_auth_plugin_stops_building_spans_nothing_exports(services):
    """No exporter: record-span answers NotFound as in Envoy, once; the plugin goes on
    deciding as before and asks no more."""
    from meshgate.otel import setup_tracing

    _, calls = _counted_tracing(services, setup_tracing("test"))
    assert await _auth_requests(services, (API_KEY, "wrong", API_KEY)) == [200, 401, 200]
    assert calls == {"wasi:tracing/record-span": 1}
