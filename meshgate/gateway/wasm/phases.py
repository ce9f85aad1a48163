"""A request's phases in one call each, as the data path runs them (decision 2300).

``headers_phase`` shows a request's or response's plugins its headers as a
``LiveHeaderMap`` (pseudo-headers first, then the data path's own ``CIMultiDict``, which
their edits change in place) and drives the plugins over it; ``body_phase`` does the
same for a response body read whole.
Where the compiled driver runs, each is one C call (``_phases.h``), as is
``stream_info``: the eight Python frames they replace cost a plugged request about 14,800
instructions (decision 2300). The functions here are the reference both are tested
against.
"""

from __future__ import annotations

from typing import Any

from ._rawcall import COMPILED_DRIVER
from .context import Buffer, StreamInfo
from .headers import LiveHeaderMap
from .stream import REQUEST_HEADERS, RESPONSE_BODY, RESPONSE_HEADERS, drive_phase

#: What a phase that did not settle answers: the map or buffer the plugins were shown,
#: and ``drive_phase``'s ``(index, action)`` of the first plugin that did not continue.
Unsettled = tuple[Any, tuple[int, Any]]

__all__ = ["REQUEST_HEADERS", "RESPONSE_HEADERS", "RESPONSE_BODY", "body_phase",
           "compile_chain", "edited_pseudo", "headers_phase", "stream_info"]


def headers_phase_py(streams: list[Any], phase: int, pseudo: list[tuple[str, str]],
                     headers: Any, end_of_stream: bool, code: int | None,
                     watched: str) -> str | Unsettled | None:
    """The plugins over ``pseudo`` (a list the map keeps) then ``headers``, in
    ``streams``' order; their edits land in ``headers`` as they make them.

    When every plugin continued, the answer is ``edited_pseudo``'s. Otherwise
    ``(map, (index, action))``: the caller carries out the action, goes on from
    ``index + 1`` and then calls ``edited_pseudo``.
    """
    hmap = LiveHeaderMap(pseudo, headers)
    stopped = drive_phase(streams, 0, phase, hmap, end_of_stream, code)
    if stopped is not None:
        return hmap, stopped
    return edited_pseudo(hmap, watched)


def edited_pseudo(hmap: LiveHeaderMap, watched: str) -> str | None:
    """A settled phase's answer: the ``watched`` pseudo-header's value if an edit named a
    pseudo-header, else None (also if one removed it): the caller keeps its own.

    Plugins edit ordinary headers far more often than ``:path`` or ``:status`` (a rate
    limiter's quota headers on every response): the pseudo-headers are not searched when
    no edit named one (decision 2500)."""
    return hmap.get(watched) if hmap.touched else None


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
    COMPILED_DRIVER.configure_phases(LiveHeaderMap(), Buffer(b"", True), StreamInfo())
headers_phase = COMPILED_DRIVER.headers_phase if COMPILED_DRIVER is not None else headers_phase_py
body_phase = COMPILED_DRIVER.body_phase if COMPILED_DRIVER is not None else body_phase_py
stream_info = COMPILED_DRIVER.stream_info if COMPILED_DRIVER is not None else stream_info_py
#: ``compile_chain(template, start)``: the data path's ``PluginChain`` start and phases as
#: C methods (``_chain.h``), or None without the compiled driver. ``filters.py`` calls it.
compile_chain = COMPILED_DRIVER.compile_chain if COMPILED_DRIVER is not None else None
