"""The sidecar's tracer: the process's OpenTelemetry SDK provider, or one of its own.

Every request gets a server span whether or not spans are exported, because the span's
trace id is what the latency histogram's exemplars and the plugins' `wasi:tracing`
parent refer to. Export follows the standard `OTEL_EXPORTER_OTLP_*` variables.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

SERVICE_NAME = "meshgate-sidecar"


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
