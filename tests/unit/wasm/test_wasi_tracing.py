"""wasi:tracing through the proxy-wasm host: plugin spans become children of the stream's."""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshgate.gateway.wasm import StreamInfo
from meshgate.otel import WasiTracing, setup_tracing

from .conftest import call_in

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ARG, ARG2 = 512, 2048


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter, services) -> WasiTracing:
    provider = setup_tracing("test", processor=SimpleSpanProcessor(exporter))
    wt = WasiTracing(provider, event_window_s=60)
    services.foreign_functions.update(wt.functions())
    return wt


async def _call(host, ctx, name: bytes, args: bytes) -> tuple[int, bytes]:
    mem = host.vm.mem
    mem.write(ARG, name)
    mem.write(ARG2, args)
    status = call_in(host, ctx, "proxy_call_foreign_function", ARG, len(name), ARG2, len(args),
                     0, 4)
    ptr, size = mem.read_u32(0), mem.read_u32(4)
    return status, mem.read(ptr, size) if status == 0 and size else b""


async def test_parent_span_is_the_streams_traceparent(load, tracing):
    from .wat import plugin
    host = await load(plugin())
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT, tracestate="k=v")).ctx
    status, value = await _call(host, ctx, b"wasi:tracing/get-parent-span", b"")
    assert (status, value) == (0, (TRACEPARENT + "\nk=v").encode())


async def test_no_parent_outside_a_traced_stream_is_not_found(load, tracing):
    from .wat import plugin
    host = await load(plugin())
    assert (await _call(host, host.root, b"wasi:tracing/get-parent-span", b""))[0] == 1


async def test_recorded_span_is_a_child_of_the_stream_span(load, tracing, exporter):
    from .wat import plugin
    host = await load(plugin(), name="ratelimit")
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT)).ctx
    record = {"name": "bucket lookup", "kind": "internal", "start_unix_nanos": 1_000,
              "end_unix_nanos": 5_000, "attributes": {"bucket": "a", "tokens": 3},
              "status": {"code": "error", "message": "denied"}}
    status, span_id = await _call(host, ctx, b"wasi:tracing/record-span",
                                  json.dumps(record).encode())
    assert status == 0 and len(span_id) == 16
    event = {"span_id": span_id.decode(), "name": "refill", "time_unix_nanos": 2_000,
             "attributes": {"n": 1}}
    assert (await _call(host, ctx, b"wasi:tracing/add-event", json.dumps(event).encode()))[0] == 0
    tracing.flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "bucket lookup"
    assert span.kind is SpanKind.INTERNAL
    assert (span.start_time, span.end_time) == (1_000, 5_000)
    assert f"{span.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert f"{span.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert f"{span.context.span_id:016x}" == span_id.decode()
    assert span.attributes["bucket"] == "a" and span.attributes["meshgate.plugin"] == "ratelimit"
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "denied"
    assert [e.name for e in span.events] == ["refill"]


async def test_bad_arguments(load, tracing):
    from .wat import plugin
    host = await load(plugin())
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT)).ctx
    assert (await _call(host, ctx, b"wasi:tracing/record-span", b"{not json"))[0] == 4
    assert (await _call(host, ctx, b"wasi:tracing/record-span", b'{"name": "x"}'))[0] == 2
    unknown = json.dumps({"span_id": "00" * 8, "name": "e", "time_unix_nanos": 1}).encode()
    assert (await _call(host, ctx, b"wasi:tracing/add-event", unknown))[0] == 1


@pytest.fixture
def unexported(services) -> WasiTracing:
    """A provider with no processor: nothing would ever see a span."""
    wt = WasiTracing(setup_tracing("test"), event_window_s=60)
    services.foreign_functions.update(wt.functions())
    return wt


async def test_without_an_exporter_only_the_parent_span_answers(load, unexported):
    """Nothing exports spans: record-span and add-event answer NotFound, as Envoy answers
    them, so a plugin stops building spans; the trace context still propagates."""
    from .wat import plugin
    host = await load(plugin())
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT)).ctx
    record = {"name": "lookup", "start_unix_nanos": 1, "end_unix_nanos": 2}
    assert await _call(host, ctx, b"wasi:tracing/record-span",
                       json.dumps(record).encode()) == (1, b"")
    assert (await _call(host, ctx, b"wasi:tracing/record-span", b"{not json"))[0] == 1
    event = {"span_id": "b7ad6b7169203331", "name": "e", "time_unix_nanos": 1}
    assert (await _call(host, ctx, b"wasi:tracing/add-event", json.dumps(event).encode()))[0] == 1
    assert await _call(host, ctx, b"wasi:tracing/get-parent-span", b"") == (
        0, TRACEPARENT.encode())


async def test_a_processor_added_later_gets_the_plugins_spans(load, unexported):
    from .wat import plugin
    host = await load(plugin())
    exporter = InMemorySpanExporter()
    unexported.provider.add_span_processor(SimpleSpanProcessor(exporter))
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT)).ctx
    record = {"name": "late", "start_unix_nanos": 1, "end_unix_nanos": 2}
    status, span_id = await _call(host, ctx, b"wasi:tracing/record-span",
                                  json.dumps(record).encode())
    unexported.flush()
    (span,) = exporter.get_finished_spans()
    assert status == 0 and f"{span.context.span_id:016x}" == span_id.decode()


# The plugins' compact encoding, and variants around it.
_COMPACT = (b'{"name":"meshgate.auth","kind":"internal","start_unix_nanos":10,'
            b'"end_unix_nanos":20,"attributes":{"auth.method":"api_key","n":200,'
            b'"ok":true,"r":-1.5e3},"status":{"code":"ok","message":""}}')
RECORD_CASES = [
    (_COMPACT, 0),
    (b'{"name":"x","start_unix_nanos":1,"end_unix_nanos":1}', 0),
    (b' { "name" : "a\\"b\\u00e9" , "start_unix_nanos" : 0 , "end_unix_nanos" : 3 } ', 0),
    ('{"name":"caf\u00e9","start_unix_nanos":1,"end_unix_nanos":2}'.encode(), 0),
    (b'{"start_unix_nanos":1,"end_unix_nanos":2,"name":"reordered"}', 0),
    (_COMPACT.replace(b'"end_unix_nanos":20', b'"end_unix_nanos":5'), 2),
    (_COMPACT.replace(b'"internal"', b'"sideways"'), 2),
    (_COMPACT.replace(b'"ok","message"', b'"fine","message"'), 2),
    (_COMPACT.replace(b'"n":200', b'"n":null'), 2),
    (_COMPACT.replace(b'"n":200', b'"n":[1]'), 2),
    (_COMPACT.replace(b'"start_unix_nanos":10', b'"start_unix_nanos":010'), 4),
    (_COMPACT.replace(b'"name":"meshgate.auth"', b'"name":7'), 2),
    (_COMPACT[:-1], 4),
    (_COMPACT + b"x", 4),
    (b'{"name":"x\xff","start_unix_nanos":1,"end_unix_nanos":2}', 2),
]


@pytest.mark.parametrize(("args", "expected"), RECORD_CASES)
async def test_record_span_status(load, tracing, args, expected):
    from .wat import plugin
    host = await load(plugin())
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT)).ctx
    status, span_id = await _call(host, ctx, b"wasi:tracing/record-span", args)
    assert status == expected
    assert len(span_id) == (16 if expected == 0 else 0)


async def test_add_event_answers_until_the_span_window_passes(load, services) -> None:
    from .wat import plugin
    exporter = InMemorySpanExporter()
    provider = setup_tracing("test", processor=SimpleSpanProcessor(exporter))
    services.foreign_functions.update(WasiTracing(provider, event_window_s=0.05).functions())
    host = await load(plugin())
    ctx = host.new_stream(StreamInfo(traceparent=TRACEPARENT)).ctx
    record = {"name": "lookup", "start_unix_nanos": 1, "end_unix_nanos": 2}
    _, span_id = await _call(host, ctx, b"wasi:tracing/record-span", json.dumps(record).encode())
    event = json.dumps({"span_id": span_id.decode(), "name": "e", "time_unix_nanos": 1})
    assert (await _call(host, ctx, b"wasi:tracing/add-event", event.encode()))[0] == 0
    await asyncio.sleep(0.1)  # past the window: the span has ended and been exported
    assert (await _call(host, ctx, b"wasi:tracing/add-event", event.encode()))[0] == 1
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["e"]
    not_a_string = json.dumps({"span_id": 7, "name": "e", "time_unix_nanos": 1}).encode()
    assert (await _call(host, ctx, b"wasi:tracing/add-event", not_a_string))[0] == 2
