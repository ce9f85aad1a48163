"""Tracing for every part of meshgate; a leaf package that imports no other meshgate part.

- ``setup_tracing(...)``: a TracerProvider with an OTLP exporter (explicit arguments, the
  standard ``OTEL_*`` variables honoured).
- ``WasiTracing``: the ``wasi:tracing/*`` foreign functions plugins call through
  proxy-wasm (contract: ``wit/tracing.wit``; encodings: docs/internals.md). Register them
  with the proxy-wasm host: ``services.foreign_functions.update(WasiTracing(p).functions())``.
"""

from .setup import otlp_configured, setup_tracing, spans_consumed
from .wasi_tracing import WasiTracing, parse_traceparent

__all__ = ["WasiTracing", "otlp_configured", "parse_traceparent", "setup_tracing",
           "spans_consumed"]
