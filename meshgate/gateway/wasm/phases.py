"""A request's phases in one call each, as the data path runs them (decision 2300).

``headers_phase`` builds the ``HeaderMap`` a request's or response's plugins see
(pseudo-headers first), drives the plugins over it and writes their edits back onto the
data path's own headers; ``body_phase`` does the same for a response body read whole.
Where the compiled driver runs, each is one C call (``_phases.h``), as is
``stream_info``: the eight Python frames they replace cost a plugged request about 14,800
instructions (decision 2300). The functions here are the reference both are tested
against.
"""

from __future__ import annotations

from typing import Any

from ._rawcall import COMPILED_DRIVER
from .context import Buffer, StreamInfo
from .headers import ADD, SET, HeaderMap
from .stream import REQUEST_HEADERS, RESPONSE_BODY, RESPONSE_HEADERS, drive_phase

#: What a phase that did not settle answers: the map or buffer the plugins were shown,
#: and ``drive_phase``'s ``(index, action)`` of the first plugin that did not continue.
Unsettled = tuple[Any, tuple[int, Any]]

__all__ = ["REQUEST_HEADERS", "RESPONSE_HEADERS", "RESPONSE_BODY", "body_phase",
           "headers_phase", "stream_info", "write_back", "written_back"]


def write_back(hmap: HeaderMap, headers: Any) -> None:
    """The plugins' edits of ``hmap`` onto ``headers`` (a ``CIMultiDict``), the map it
    was built from.

    Replayed one by one where the map logged them (decision 1500): a plugin sets a few
    headers, and ``CIMultiDict`` does each edit as ``HeaderMap`` does (a set replaces the
    first value in place and drops the others), at a tenth of the cost of a rebuild.
    Pseudo-headers are not in ``headers``: the caller reads them from the map.
    """
    log = hmap.log
    if log is None:
        headers.clear()
        # The map's own list, read without the copy `items()` makes: nothing edits it here.
        headers.extend([(name, value) for name, value in hmap._items if name[:1] != ":"])
        return
    for op, name, value in log:
        if name[:1] == ":":
            continue
        if op == SET:
            headers[name] = value
        elif op == ADD:
            headers.add(name, value)
        else:
            headers.popall(name, None)


def headers_phase_py(streams: list[Any], phase: int, pseudo: list[tuple[str, str]],
                     headers: Any, end_of_stream: bool, code: int | None,
                     watched: str) -> str | Unsettled | None:
    """The plugins over a map of ``pseudo`` then ``headers``, in ``streams``' order.

    When every plugin continued, the edits are on ``headers`` and the answer is what
    ``written_back`` answers. Otherwise ``(map, (index, action))``: the caller carries out
    the action, goes on from ``index + 1`` and then calls ``written_back``.
    """
    hmap = HeaderMap.with_pseudo(pseudo, headers)
    stopped = drive_phase(streams, 0, phase, hmap, end_of_stream, code)
    if stopped is not None:
        return hmap, stopped
    return written_back(hmap, headers, watched)


def written_back(hmap: HeaderMap, headers: Any, watched: str) -> str | None:
    """A settled phase's end: the edits of ``hmap`` written onto ``headers``, and the
    ``watched`` pseudo-header's value if an edit named it (None if none did, or if one
    removed it: the caller keeps its own). The data path calls it itself after a phase
    that paused.

    Plugins edit ordinary headers far more often than ``:path`` or ``:status`` (a rate
    limiter's quota headers on every response): the map is not searched for a
    pseudo-header no edit named (decision 2500)."""
    if not hmap.edits:
        return None
    write_back(hmap, headers)
    log = hmap.log
    if log is not None and all(name != watched for _, name, _ in log):
        return None
    return hmap.get(watched)


def body_phase_py(streams: list[Any], body: bytes) -> bytes | Unsettled:
    """The plugins over a response body read whole (end of stream), in ``streams``' order,
    sharing one buffer: the body after them, or ``(buffer, (index, action))`` as
    ``headers_phase`` answers."""
    buffer = Buffer(bytearray(body), True)
    stopped = drive_phase(streams, 0, RESPONSE_BODY, buffer, True, None)
    if stopped is not None:
        return buffer, stopped
    return bytes(buffer.data)


def stream_info_py(request_id: str, traceparent: str | None, tracestate: str | None,
                   span: Any, connection: Any, route_name: str,
                   cluster_name: str) -> StreamInfo:
    """A request's ``StreamInfo``; the addresses come from ``connection`` when asked."""
    return StreamInfo("", "", request_id, traceparent, tracestate, span, connection,
                      route_name, cluster_name)


if COMPILED_DRIVER is not None:
    # What the compiled phases copy: each as its constructor leaves it.
    COMPILED_DRIVER.configure_phases(HeaderMap(), Buffer(b"", True), StreamInfo(), write_back)
headers_phase = COMPILED_DRIVER.headers_phase if COMPILED_DRIVER is not None else headers_phase_py
body_phase = COMPILED_DRIVER.body_phase if COMPILED_DRIVER is not None else body_phase_py
stream_info = COMPILED_DRIVER.stream_info if COMPILED_DRIVER is not None else stream_info_py
