"""Tracing setup: one ``TracerProvider`` with an OTLP exporter, configured in one place.

Explicit arguments win; otherwise the standard variables apply (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_SDK_DISABLED``), which the OpenTelemetry SDK and exporter read themselves. Nothing
happens at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter


def otlp_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment names an OTLP endpoint for traces."""
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str | None = None, *, endpoint: str | None = None,
                  headers: Mapping[str, str] | None = None, insecure: bool | None = None,
                  exporter: SpanExporter | None = None,
                  processor: SpanProcessor | None = None) -> TracerProvider:
    """Build (not install) a provider; the caller installs it or passes it around.

    ``exporter``/``processor`` replace the OTLP exporter (tests use an in-memory one).
    Without an endpoint argument or variable, spans are created but not exported.
    """
    attrs = {SERVICE_NAME: service_name} if service_name else {}
    provider = TracerProvider(resource=Resource.create(attrs))
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return provider
    if processor is not None:
        provider.add_span_processor(processor)
        return provider
    if exporter is None and (endpoint or otlp_configured()):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, headers=dict(headers) if headers else None,
                                    insecure=insecure)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def spans_consumed(provider: trace.TracerProvider) -> bool:
    """Whether a span built through ``provider`` would be seen or change anything.

    False only for the SDK's provider with no span processor (nothing exports or reads
    spans) and the default sampler (parent-based, always on: a new span is sampled unless
    its parent is not, so its flags are known without asking the sampler). Then callers
    may use a non-recording span with fresh ids, which carries the same trace context for
    propagation and exemplars at a fraction of the cost. Read on every call: a processor
    added later (tests, a late exporter) turns full spans back on.
    """
    if not isinstance(provider, TracerProvider):
        return True  # an API-only or foreign provider: let it decide, as before
    if provider.sampler is not sampling.DEFAULT_ON:
        return True
    # The SDK keeps its processors in a tuple on the multi-processor; no public accessor.
    processors = getattr(provider._active_span_processor, "_span_processors", None)
    return processors is None or bool(processors)
