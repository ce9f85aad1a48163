"""The sidecar's request spans: full SDK spans when something consumes them, a light
span context otherwise; both propagate the same W3C trace context."""

from __future__ import annotations

from multidict import CIMultiDict
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from meshgate.gateway.tracing import (
    id_generator,
    inject_w3c,
    light_server_span,
    spans_consumed,
    w3c_context,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def _outgoing(incoming: dict[str, str]) -> CIMultiDict[str]:
    span = light_server_span(CIMultiDict(incoming), id_generator(TracerProvider()))
    out: CIMultiDict[str] = CIMultiDict(incoming)
    inject_w3c(w3c_context(span), out)
    return out


def test_only_a_provider_with_processors_or_a_custom_sampler_consumes_spans() -> None:
    provider = TracerProvider()
    assert not spans_consumed(provider)
    assert spans_consumed(TracerProvider(sampler=ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert spans_consumed(provider)


def test_the_callers_trace_continues_with_a_new_span_and_its_tracestate() -> None:
    out = _outgoing({"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    version, trace_id, span_id, flags = out["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != "b7ad6b7169203331" and len(span_id) == 16
    assert out["tracestate"] == "vendor=1"


def test_an_unsampled_caller_stays_unsampled() -> None:
    out = _outgoing({"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-00"})
    assert out["traceparent"].endswith("-00")


def test_a_malformed_or_absent_traceparent_starts_a_new_sampled_trace() -> None:
    for incoming in ({}, {"traceparent": "00-xyz-b7ad6b7169203331-01"},
                     {"traceparent": f"00-{'0' * 32}-b7ad6b7169203331-01"}):
        version, trace_id, span_id, flags = _outgoing(incoming)["traceparent"].split("-")
        assert version == "00" and flags == "01"
        assert trace_id not in (TRACE_ID, "0" * 32) and int(span_id, 16) != 0


def test_light_and_full_spans_propagate_the_same_way() -> None:
    """What the SDK's span plus the W3C propagator send, the light span sends too."""
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    incoming = {"traceparent": TRACEPARENT, "tracestate": "a=b"}
    parent = propagator.extract(incoming)
    full = provider.get_tracer("t").start_span("s", context=parent)
    token = context.attach(trace.set_span_in_context(full, parent))
    try:
        by_sdk: dict[str, str] = {}
        propagator.inject(by_sdk)
    finally:
        context.detach(token)
    light = _outgoing(incoming)
    assert by_sdk["traceparent"].split("-")[::3] == light["traceparent"].split("-")[::3]
    assert by_sdk["traceparent"].split("-")[1] == light["traceparent"].split("-")[1]
    assert by_sdk["tracestate"] == light["tracestate"]
