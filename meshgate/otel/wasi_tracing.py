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
``record-span`` still validates its argument and answers a span id that ``add-event``
accepts for the same window, but builds no span (the SDK span cost ~9 µs a call,
decision 0700) and keeps nothing per span (``UnrecordedSpans``, decision 1100).

Recorded spans stay open for ``event_window_s`` so ``add-event`` can still attach events
(an ended OpenTelemetry span is immutable); they end with the plugin's own end time,
either when the window passes (checked on every call) or on ``flush()``.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import OrderedDict, deque
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

# A record-span argument that this pattern matches in full is valid JSON whose fields all
# pass ``record_span``'s checks except ``end >= start`` (compared after the match). When no
# span is built that is all the call needs, so the JSON decode (~7-14 µs under load,
# decision 0900) is skipped. Anything else (other key orders, non-ASCII text, nulls,
# nested values) takes the full ``json.loads`` path, which decides the status as before:
# the pattern only ever answers "certainly OK", never an error.
_WS = rb"[ \t\n\r]*+"
# Strings as runs of plain ASCII between escapes (an alternation per character made the
# match cost as much as the decode). Possessive repeats: no token can start with what
# the repeat consumed, so backtracking into them could never help.
_PLAIN = rb'[^"\\\x00-\x1f\x80-\xff]*+'
_STR = rb'"' + _PLAIN + rb'(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})' + _PLAIN + rb')*"'
_INT = rb"(-?(?:0|[1-9][0-9]*+))"
_NUM = rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?"
_VALUE = rb"(?:" + _STR + rb"|" + _NUM + rb"|true|false)"
_PAIR = _STR + _WS + rb":" + _WS + _VALUE
_FAST_RECORD_PATTERN = re.compile(
    _WS + rb"\{" + _WS + rb'"name"' + _WS + rb":" + _WS + _STR
    + rb"(?:" + _WS + rb"," + _WS + rb'"kind"' + _WS + rb":" + _WS
    + rb'"(?:internal|server|client|producer|consumer)")?'
    + _WS + rb"," + _WS + rb'"start_unix_nanos"' + _WS + rb":" + _WS + _INT
    + _WS + rb"," + _WS + rb'"end_unix_nanos"' + _WS + rb":" + _WS + _INT
    + rb"(?:" + _WS + rb"," + _WS + rb'"attributes"' + _WS + rb":" + _WS + rb"\{" + _WS
    + rb"(?:" + _PAIR + rb"(?:" + _WS + rb"," + _WS + _PAIR + rb")*" + _WS + rb")?\})?"
    + rb"(?:" + _WS + rb"," + _WS + rb'"status"' + _WS + rb":" + _WS + rb"\{" + _WS
    + rb'"code"' + _WS + rb":" + _WS + rb'"(?:unset|ok|error)"'
    + rb"(?:" + _WS + rb"," + _WS + rb'"message"' + _WS + rb":" + _WS + _STR + rb")?"
    + _WS + rb"\})?"
    + _WS + rb"\}" + _WS,
)


def _match_with_pattern(args: bytes) -> tuple[bytes, bytes] | None:
    """(start, end) digits of an argument the pattern matches in full, or None."""
    found = _FAST_RECORD_PATTERN.fullmatch(args)
    return (found[1], found[2]) if found is not None else None


_FAST_RECORD: Callable[[bytes], tuple[bytes, bytes] | None] = _match_with_pattern


def _use_compiled_match() -> None:
    """The same check compiled (a scanner of the pattern's language: 0.4 µs against the
    pattern's 3-4 µs on the auth plugin's spans, decision 1100), where the sidecar's
    extension is built. Imported when a tracer is made: importing it loads the wasm host,
    which other users of this module (the control server) do not need.
    tests/unit/wasm/test_record_span_match.py holds the two equal."""
    global _FAST_RECORD
    try:
        from meshgate.gateway.wasm._crossing import match_record_span
    except ImportError:  # pragma: no cover - only when the extension was not built
        return
    _FAST_RECORD = match_record_span


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


_ID_SPACE = 2**64 - 1  # span ids 1 .. 2**64-1 (0 is the invalid span id)


class UnrecordedSpans:
    """Span ids answered for spans nothing records, and which are still open for events.

    The ids are consecutive numbers from a random start (an id is `start + n`), so
    whether an id is open follows from three things: its number, how many were issued
    since (at most `bound` stay open), and when its batch was issued (open for the event
    window). Nothing is kept per span. A batch takes the ids issued within 1/100 of the
    window, and stays open until a window after its last possible id. Before, each span
    took an entry in the ordered table of recorded spans, with an id drawn, expired one
    by one: about 10 µs of every plugged request (decision 1100).
    """

    def __init__(self, window_s: float, bound: int) -> None:
        self._start = random.randrange(_ID_SPACE)
        self._next = 0
        self._open_from = 0  # the lowest number still open
        self._window_s = window_s
        self._step_s = window_s / 100
        self._bound = bound
        self._batches: deque[tuple[int, float]] = deque()  # (first number, deadline)
        self._batch_until = float("-inf")

    def issue(self, now: float) -> bytes:
        """A new id; ids whose window has passed close first."""
        batches = self._batches
        if batches and batches[0][1] <= now:  # expire's first test, inline: every request
            self.expire(now)
        number = self._next
        self._next = number + 1
        if now >= self._batch_until:
            self._batch_until = now + self._step_s
            batches.append((number, self._batch_until + self._window_s))
        return f"{(self._start + number) % _ID_SPACE + 1:016x}".encode()

    def expire(self, now: float) -> None:
        batches = self._batches
        while batches and batches[0][1] <= now:
            batches.popleft()
            self._open_from = batches[0][0] if batches else self._next

    def is_open(self, span_id: str) -> bool:
        if len(span_id) != 16:
            return False
        try:
            number = (int(span_id, 16) - 1 - self._start) % _ID_SPACE
        except ValueError:
            return False
        return self._open_from <= number < self._next and self._next - number <= self._bound

    def close_all(self) -> None:
        self._batches.clear()
        self._open_from = self._next


class WasiTracing:
    """The three functions, bound to one tracer. Register ``functions()`` with the host."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 event_window_s: float = 1.0, max_open_spans: int = 4096) -> None:
        _use_compiled_match()
        provider = tracer_provider or trace.get_tracer_provider()
        self.provider = provider
        self.tracer = provider.get_tracer("meshgate.wasi-tracing")
        self.event_window_s = event_window_s
        self.max_open_spans = max_open_spans
        # span id (hex) -> (span, plugin end time ns, wall-clock deadline for events)
        self._open: OrderedDict[str, tuple[Any, int, float]] = OrderedDict()
        self._unrecorded = UnrecordedSpans(event_window_s, max_open_spans)

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
        # _expire's own first test, inlined: this runs on every plugged request.
        if opened and next(iter(opened.values()))[2] <= now:
            self._expire(now)
        if not spans_consumed(self.provider):
            fast = _FAST_RECORD(args)
            if fast is not None:
                if int(fast[1]) < int(fast[0]):
                    return BAD_ARGUMENT, b""
                return OK, self._unrecorded_span(now)
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
        if not spans_consumed(self.provider):
            return OK, self._unrecorded_span(now)
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

    def _unrecorded_span(self, now: float) -> bytes:
        """Nothing would see the span: an id that add-event accepts for the event window,
        as it would for an exported span."""
        return self._unrecorded.issue(now)

    def _remember(self, span_id: str, span: Any, end: int, now: float) -> None:
        """Keep a recorded span open for add-event (``span`` None: not exported)."""
        self._open[span_id] = (span, end, now + self.event_window_s)
        if len(self._open) > self.max_open_spans:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest open spans over the bound, ending the exported ones."""
        while len(self._open) > self.max_open_spans:
            _, (old, old_end, _) = self._open.popitem(last=False)
            if old is not None:
                old.end(end_time=old_end)

    def add_event(self, args: bytes, call: Any) -> Result:
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
        entry = self._open.get(span_id)
        if entry is None:
            self._expire()
            self._unrecorded.expire(time.monotonic())
            return (OK if self._unrecorded.is_open(span_id) else NOT_FOUND), b""
        if entry[0] is not None:
            entry[0].add_event(name, attributes=attributes, timestamp=when)
        self._expire()
        return OK, b""

    def _expire(self, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        while self._open:
            span_id, (span, end, deadline) = next(iter(self._open.items()))
            if deadline > now:
                return
            del self._open[span_id]
            if span is not None:
                span.end(end_time=end)

    def flush(self) -> None:
        """End every recorded span now (at shutdown, or in tests)."""
        self._unrecorded.close_all()
        while self._open:
            _, (span, end, _) = self._open.popitem(last=False)
            if span is not None:
                span.end(end_time=end)
