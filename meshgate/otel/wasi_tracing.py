"""The ``wasi:tracing/*`` foreign functions: plugin-recorded spans become OpenTelemetry spans.

Encodings are the table in docs/internals.md (contract: ``wit/tracing.wit``):

- ``wasi:tracing/get-parent-span``: no arguments; answers
  ``00-<trace id>-<span id>-<flags>`` and, if there is trace state, ``\\n<tracestate>``.
- ``wasi:tracing/record-span``: a JSON object (name, kind, start/end unix nanos,
  attributes, status); answers the new span's 16-hex span id. The span is a child of the
  stream's span.
- ``wasi:tracing/add-event``: a JSON object (span_id, name, time_unix_nanos, attributes);
  answers nothing.

Each function is ``fn(args: bytes, call) -> (proxy_status, result bytes)`` where ``call``
carries ``traceparent``, ``tracestate`` and ``span`` (the stream's OpenTelemetry span,
if the data path has one) — the proxy-wasm host's ``ForeignCall``. This module imports no
other part of meshgate, so it takes ``call`` by shape.

When nothing consumes spans (``spans_consumed``: no processor, default sampler),
``record-span`` and ``add-event`` answer NotFound, as Envoy answers every ``wasi:tracing``
call: a span nobody exports changes nothing a user can see, and a plugin that learns
this skips building spans (decision 1300). ``get-parent-span`` answers either way: the
trace context still propagates, to an ``http_call`` for instance.

Recorded spans stay open for ``event_window_s`` so ``add-event`` can still attach events
(an ended OpenTelemetry span is immutable); they end with the plugin's own end time,
either when the window passes (checked on every call) or on ``flush()``.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from .setup import spans_consumed

# proxy_status_t values (kept local: this module must not import the wasm host).
OK, NOT_FOUND, BAD_ARGUMENT, PARSE_FAILURE = 0, 1, 2, 4

GET_PARENT_SPAN = "wasi:tracing/get-parent-span"
RECORD_SPAN = "wasi:tracing/record-span"
ADD_EVENT = "wasi:tracing/add-event"

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT,
          "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}
_CODES = {"unset": StatusCode.UNSET, "ok": StatusCode.OK, "error": StatusCode.ERROR}

Result = tuple[int, bytes]

def parse_traceparent(traceparent: str, tracestate: str | None = None) -> SpanContext | None:
    """A W3C ``traceparent`` (version 00) as a remote SpanContext, or None if malformed."""
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or parts[0] != "00":
        return None
    _, tid, sid, flags = parts
    try:
        if len(tid) != 32 or len(sid) != 16 or len(flags) != 2:
            return None
        ctx = SpanContext(int(tid, 16), int(sid, 16), is_remote=True,
                          trace_flags=TraceFlags(int(flags, 16)),
                          trace_state=TraceState.from_header([tracestate]) if tracestate
                          else TraceState())
    except ValueError:
        return None
    return ctx if ctx.is_valid else None


def _parent_context(call: Any) -> SpanContext | None:
    span = getattr(call, "span", None)
    if span is not None and hasattr(span, "get_span_context"):
        ctx = span.get_span_context()
        if ctx.is_valid:
            return ctx
    traceparent = getattr(call, "traceparent", None)
    return parse_traceparent(traceparent, getattr(call, "tracestate", None)) \
        if traceparent else None


def _attributes(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("attributes must be an object")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(v, str | int | float | bool):
            raise ValueError(f"attribute {k!r} must be a string, number or boolean")
        out[str(k)] = v
    return out


class WasiTracing:
    """The three functions, bound to one tracer. Register ``functions()`` with the host."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 event_window_s: float = 1.0, max_open_spans: int = 4096) -> None:
        provider = tracer_provider or trace.get_tracer_provider()
        self.provider = provider
        self.tracer = provider.get_tracer("meshgate.wasi-tracing")
        self.event_window_s = event_window_s
        self.max_open_spans = max_open_spans
        # span id (hex) -> (span, plugin end time ns, wall-clock deadline for events)
        self._open: OrderedDict[str, tuple[Any, int, float]] = OrderedDict()

    def functions(self) -> dict[str, Callable[[bytes, Any], Result]]:
        return {GET_PARENT_SPAN: self.get_parent_span, RECORD_SPAN: self.record_span,
                ADD_EVENT: self.add_event}

    def get_parent_span(self, args: bytes, call: Any) -> Result:
        self._expire()
        ctx = _parent_context(call)
        if ctx is None:
            return NOT_FOUND, b""
        text = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        state = ctx.trace_state.to_header()
        if state:
            text += "\n" + state
        return OK, text.encode()

    def record_span(self, args: bytes, call: Any) -> Result:
        now = time.monotonic()
        opened = self._open
        # _expire's own first test, inlined: this runs for every span a plugin records.
        if opened and next(iter(opened.values()))[2] <= now:
            self._expire(now)
        if not spans_consumed(self.provider):
            return NOT_FOUND, b""
        try:
            doc = json.loads(args)
            name = doc["name"]
            kind = _KINDS[doc.get("kind", "internal")]
            start, end = int(doc["start_unix_nanos"]), int(doc["end_unix_nanos"])
            attributes = _attributes(doc.get("attributes"))
            status = doc.get("status") or {}
            code = _CODES[status.get("code", "unset")]
            if not isinstance(name, str) or end < start:
                raise ValueError("bad name or end before start")
        except json.JSONDecodeError:
            return PARSE_FAILURE, b""
        except (KeyError, TypeError, ValueError, AttributeError):
            return BAD_ARGUMENT, b""
        parent = _parent_context(call)
        ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent \
            else otel_context.Context()
        span = self.tracer.start_span(name, context=ctx, kind=kind, attributes=attributes,
                                      start_time=start)
        span.set_attribute("meshgate.plugin", getattr(call, "plugin_name", ""))
        if code is not StatusCode.UNSET:
            span.set_status(Status(code, status.get("message") or None
                                   if code is StatusCode.ERROR else None))
        span_id = f"{span.get_span_context().span_id:016x}"
        self._remember(span_id, span, end, now)
        return OK, span_id.encode()

    def _remember(self, span_id: str, span: Any, end: int, now: float) -> None:
        """Keep a recorded span open for add-event."""
        self._open[span_id] = (span, end, now + self.event_window_s)
        if len(self._open) > self.max_open_spans:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest open spans over the bound, ending the exported ones."""
        while len(self._open) > self.max_open_spans:
            _, (old, old_end, _) = self._open.popitem(last=False)
            old.end(end_time=old_end)

    def add_event(self, args: bytes, call: Any) -> Result:
        if not self._open and not spans_consumed(self.provider):
            return NOT_FOUND, b""  # as record-span: no span to add to, and none coming
        try:
            doc = json.loads(args)
            span_id, name = doc["span_id"], doc["name"]
            if not isinstance(span_id, str):
                raise TypeError("span_id must be a string")
            when = int(doc["time_unix_nanos"])
            attributes = _attributes(doc.get("attributes"))
        except json.JSONDecodeError:
            return PARSE_FAILURE, b""
        except (KeyError, TypeError, ValueError):
            return BAD_ARGUMENT, b""
        self._expire()  # first: a span past its window has ended, and takes no event
        entry = self._open.get(span_id)
        if entry is None:
            return NOT_FOUND, b""
        entry[0].add_event(name, attributes=attributes, timestamp=when)
        return OK, b""

    def _expire(self, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        while self._open:
            span_id, (span, end, deadline) = next(iter(self._open.items()))
            if deadline > now:
                return
            del self._open[span_id]
            span.end(end_time=end)

    def flush(self) -> None:
        """End every recorded span now (at shutdown, or in tests)."""
        while self._open:
            _, (span, end, _) = self._open.popitem(last=False)
            span.end(end_time=end)
