"""The sidecar's tracer: the process's OpenTelemetry SDK provider, or one of its own.

Every request gets a server span whether or not spans are exported, because the span's
trace id is what the latency histogram's exemplars and the plugins' `wasi:tracing`
parent refer to. Export follows the standard `OTEL_EXPORTER_OTLP_*` variables.

When nothing consumes spans (no processor, default sampler: `meshgate.otel.spans_consumed`)
a request's span is a `NonRecordingSpan` with fresh ids: the same W3C context goes to
the upstream, the plugins and the exemplars, without the SDK's span machinery (about
30 µs a request on this machine; decision 0700).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshgate.otel import spans_consumed

SERVICE_NAME = "meshgate-sidecar"
_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


def sidecar_tracer_provider() -> trace.TracerProvider:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current  # configured by the process (e.g. meshgate.otel): use it as is
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def light_server_span(headers: Mapping[str, str], ids: IdGenerator) -> NonRecordingSpan:
    """A span context as the SDK's default sampler would make it, without a span.

    The parent comes from the W3C `traceparent`/`tracestate` headers (parsed by
    OpenTelemetry's own propagator, so malformed headers are refused the same way). Ids
    come from the provider's generator (`ids`): the span id is fresh, the trace id is
    the parent's or fresh, and the sampled flag follows the parent (parent-based,
    always on for a new trace).
    """
    parent = None
    if "traceparent" in headers:
        ctx = trace.get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
        parent = ctx if ctx.is_valid else None
    span_id = ids.generate_span_id()
    if parent is None:
        return NonRecordingSpan(
            SpanContext(ids.generate_trace_id(), span_id, False, _SAMPLED)
        )
    flags = _SAMPLED if parent.trace_flags.sampled else _NOT_SAMPLED
    return NonRecordingSpan(
        SpanContext(parent.trace_id, span_id, False, flags, parent.trace_state)
    )


def id_generator(provider: trace.TracerProvider) -> IdGenerator:
    """The provider's id generator (the SDK's random one if it has none)."""
    ids = getattr(provider, "id_generator", None)
    return ids if isinstance(ids, IdGenerator) else RandomIdGenerator()


def w3c_context(span: trace.Span) -> tuple[str, str] | None:
    """`span`'s `traceparent` and `tracestate` header values ("" when there is no state),
    or None for an invalid context. Computed once per request: the upstream headers, the
    plugins' stream info and the latency exemplar all use it."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    parent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    return parent, ctx.trace_state.to_header() if ctx.trace_state else ""


def inject_w3c(context: tuple[str, str] | None, headers: MutableMapping[str, str]) -> None:
    """What the W3C propagator's `inject` writes for a span, without the current context,
    from its `w3c_context`: `traceparent`, and `tracestate` when there is any."""
    if context is None:
        return
    headers["traceparent"] = context[0]
    if context[1]:
        headers["tracestate"] = context[1]


__all__ = ["id_generator", "inject_w3c", "light_server_span", "sidecar_tracer_provider",
           "spans_consumed", "w3c_context"]
