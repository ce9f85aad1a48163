"""`headers_phase`, `body_phase` and `stream_info`: a request's phases in one call each.

The data path (`PluginChain`) runs a header phase as one call that builds the map, drives
the plugins and writes their edits back onto its own headers. The compiled phases (when
the compiled driver runs) and their Python references are checked here side by side,
against the same plugins.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
from multidict import CIMultiDict

from meshgate.gateway.wasm import (
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    LiveHeaderMap,
    StreamInfo,
    body_phase,
    edited_pseudo,
    headers_phase,
    stream_info,
)
from meshgate.gateway.wasm.phases import body_phase_py, headers_phase_py, stream_info_py

from .wat import plugin

IMPLEMENTATIONS = {"compiled or ctypes default": (headers_phase, body_phase, stream_info),
                   "python": (headers_phase_py, body_phase_py, stream_info_py)}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> tuple[Any, Any, Any]:
    return IMPLEMENTATIONS[request.param]


def pairs(*items: tuple[bytes, bytes]) -> bytes:
    """proxy-wasm's serialised header pairs."""
    sizes = b"".join(struct.pack("<II", len(k), len(v)) for k, v in items)
    return struct.pack("<I", len(items)) + sizes + b"".join(k + b"\0" + v + b"\0"
                                                             for k, v in items)


def call(name: str, map_type: int, *strings: str) -> str:
    args = " ".join(f"@{s} #{s}" for s in strings)
    return f"(drop (call ${name} (i32.const {map_type}) {args}))"


# map types: 0 request headers, 2 response headers
EDITS_REQUEST = " ".join([
    call("proxy_replace_header_map_value", 0, "path", "newpath"),
    call("proxy_add_header_map_value", 0, "added", "one"),
    call("proxy_remove_header_map_value", 0, "gone"),
    call("proxy_replace_header_map_value", 0, "kept", "two"),
    "(i32.const 0)"])
REMOVES_PATH = call("proxy_remove_header_map_value", 0, "path") + " (i32.const 0)"
SETS_STATUS = call("proxy_replace_header_map_value", 2, "status", "404") + " (i32.const 0)"
REPLACES_ALL = call("proxy_set_header_map_pairs", 0, "all") + " (i32.const 0)"
PAUSES = "(i32.const 1)"
STRINGS = {"path": b":path", "newpath": b"/b", "added": b"x-added", "one": b"1",
           "gone": b"x-gone", "kept": b"X-Kept", "two": b"2", "status": b":status",
           "404": b"404", "all": pairs((b":path", b"/c"), (b"x-only", b"3"))}


def request_headers() -> CIMultiDict[str]:
    return CIMultiDict([("Host", "svc"), ("X-Gone", "a"), ("x-kept", "0"), ("X-Gone", "b")])


PSEUDO = [(":method", "GET"), (":path", "/a"), (":authority", "svc"), (":scheme", "http")]


async def streams_of(load: Any, *snippets: str, phase: str = "on_request_headers") -> list[Any]:
    hosts = [await load(plugin(**{phase: s}, strings=STRINGS), name=f"p{i}")
             for i, s in enumerate(snippets)]
    return [host.new_stream() for host in hosts]


def finish(streams: list[Any]) -> None:
    for stream in streams:
        stream.finish()


async def test_a_phase_nobody_edits_answers_none_and_leaves_the_headers(
        load: Any, impl: Any) -> None:
    streams = await streams_of(load, "(i32.const 0)", "(i32.const 0)")
    headers = request_headers()
    assert impl[0](streams, REQUEST_HEADERS, list(PSEUDO), headers, True, None, ":path") is None
    assert list(headers.items()) == list(request_headers().items())
    # Both plugins were shown the same map, pseudo-headers first, names lower-cased.
    shown = streams[1].ctx.request_headers
    assert shown is streams[0].ctx.request_headers
    assert shown.items() == [*PSEUDO, ("host", "svc"), ("x-gone", "a"), ("x-kept", "0"),
                             ("x-gone", "b")]
    finish(streams)


async def test_edits_are_written_back_and_the_watched_pseudo_header_answered(
        load: Any, impl: Any) -> None:
    streams = await streams_of(load, EDITS_REQUEST, "(i32.const 0)")
    headers = request_headers()
    assert impl[0](streams, REQUEST_HEADERS, list(PSEUDO), headers, True, None, ":path") == "/b"
    # What a rebuild from the map would give; pseudo-headers stay out of the headers.
    assert [(k.lower(), v) for k, v in headers.items()] == [
        ("host", "svc"), ("x-kept", "2"), ("x-added", "1")]
    finish(streams)

async def test_edits_that_name_no_pseudo_header_answer_none_with_the_edits_written(
        load: Any, impl: Any) -> None:
    # A rate limiter's quota headers on every response: the caller keeps its own :status.
    edits = call("proxy_replace_header_map_value", 2, "kept", "two") + " (i32.const 0)"
    streams = await streams_of(load, edits, phase="on_response_headers")
    headers = CIMultiDict([("Server", "up")])
    out = impl[0](streams, RESPONSE_HEADERS, [(":status", "200")], headers, False, 200,
                  ":status")
    assert out is None and list(headers.items()) == [("Server", "up"), ("x-kept", "2")]
    finish(streams)



async def test_a_removed_watched_header_answers_none_with_the_edits_written(
        load: Any, impl: Any) -> None:
    streams = await streams_of(load, REMOVES_PATH)
    headers = request_headers()
    assert impl[0](streams, REQUEST_HEADERS, list(PSEUDO), headers, True, None, ":path") is None
    assert list(headers.items()) == list(request_headers().items())
    finish(streams)


async def test_a_map_replaced_whole_is_rebuilt_onto_the_headers(load: Any, impl: Any) -> None:
    streams = await streams_of(load, REPLACES_ALL)
    headers = request_headers()
    assert impl[0](streams, REQUEST_HEADERS, list(PSEUDO), headers, True, None, ":path") == "/c"
    assert list(headers.items()) == [("x-only", "3")]
    finish(streams)


async def test_response_phase_shows_the_code_and_answers_the_new_status(
        load: Any, impl: Any) -> None:
    streams = await streams_of(load, SETS_STATUS, phase="on_response_headers")
    headers = CIMultiDict([("Server", "up")])
    out = impl[0](streams, RESPONSE_HEADERS, [(":status", "200")], headers, False, 200,
                  ":status")
    assert out == "404" and list(headers.items()) == [("Server", "up")]
    assert streams[0].ctx.response_code == 200
    finish(streams)


async def test_a_pause_answers_the_map_and_where_the_phase_stopped(load: Any, impl: Any) -> None:
    streams = await streams_of(load, EDITS_REQUEST, PAUSES, "(i32.const 0)")
    headers = request_headers()
    hmap, stopped = impl[0](streams, REQUEST_HEADERS, list(PSEUDO), headers, True, None,
                            ":path")
    assert stopped == (1, None) and isinstance(hmap, LiveHeaderMap)
    assert hmap.touched and edited_pseudo(hmap, ":path") == "/b"
    # The first plugin's edits are in the headers already; the third has not run.
    assert [(k.lower(), v) for k, v in headers.items()] == [
        ("host", "svc"), ("x-kept", "2"), ("x-added", "1")]
    assert streams[2].ctx.request_headers is None
    finish(streams)


async def test_a_trap_answers_the_failure_policy(load: Any, impl: Any) -> None:
    streams = await streams_of(load, "(unreachable)")
    hmap, (index, action) = impl[0](streams, REQUEST_HEADERS, list(PSEUDO), request_headers(),
                                    True, None, ":path")
    assert index == 0 and action.status == 503
    finish(streams)


async def test_the_body_after_the_plugins_or_where_it_stopped(load: Any, impl: Any) -> None:
    replace = ("(drop (call $proxy_set_buffer_bytes (i32.const 1) (i32.const 0) "
               "(i32.const 2) @new #new)) (i32.const 0)")
    hosts = [await load(plugin(on_response_body=replace, strings={"new": b"NEW"}), name="e"),
             await load(plugin(on_response_body=PAUSES), name="p")]
    streams = [hosts[0].new_stream()]
    assert impl[1](streams, b"ok body") == b"NEW body"
    streams.append(hosts[1].new_stream())
    buffer, stopped = impl[1](streams[1:], b"held")
    assert stopped == (0, None) and bytes(buffer.data) == b"held" and buffer.mutable
    finish(streams)


def test_stream_info_holds_what_the_data_path_knows(impl: Any) -> None:
    span, connection = object(), object()
    before = time.time_ns()
    info = impl[2]("r1", "00-ab-cd-01", "k=v", span, connection, "route", "cluster")
    other = impl[2]("r2", None, None, None, None, "", "")
    assert isinstance(info, StreamInfo) and info is not other
    assert (info.request_id, info.traceparent, info.tracestate, info.span, info.connection,
            info.route_name, info.cluster_name) == ("r1", "00-ab-cd-01", "k=v", span,
                                                    connection, "route", "cluster")
    assert before <= info.start_time_ns <= other.start_time_ns <= time.time_ns()
    assert info.source_address == "" and info.protocol == "HTTP/1.1"
    assert other.request_id == "r2" and other.span is None


def test_wrong_arguments_are_refused() -> None:
    if headers_phase is headers_phase_py:
        pytest.skip("the compiled phases are not in use")
    with pytest.raises(TypeError, match="headers_phase"):
        headers_phase([], REQUEST_HEADERS, (), CIMultiDict(), True, None, ":path")
    with pytest.raises(ValueError, match="not a header phase"):
        headers_phase([], 2, [], CIMultiDict(), True, None, ":path")
    with pytest.raises(TypeError, match="body_phase"):
        body_phase((), b"")
    with pytest.raises(TypeError, match="stream_info"):
        stream_info("r1")
