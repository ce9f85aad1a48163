"""`drive_phase`: one phase of a request through a listener's plugins in one call.

The data path (`PluginChain`) runs each phase this way. Both the compiled driver and its
Python reference (`drive_phase_py`) are checked here, against the same plugins.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshgate.gateway.wasm import (
    REQUEST_HEADERS,
    RESPONSE_BODY,
    RESPONSE_HEADERS,
    Buffer,
    HeaderMap,
    LocalReply,
    drive_phase,
)
from meshgate.gateway.wasm.stream import drive_phase_py

from .wat import plugin

DRIVERS = {"compiled or ctypes default": drive_phase, "python": drive_phase_py}

# Adds `x-added: 1` to the request headers.
ADDS_A_HEADER = """
  (drop (call $proxy_add_header_map_value (i32.const 0) @k #k @v #v)) (i32.const 0)"""
# Pauses when it is shown exactly four headers (three, plus the one added before it).
PAUSES_ON_FOUR = "(if (result i32) (i32.eq (local.get $n) (i32.const 4)) " \
                 "(then (i32.const 1)) (else (i32.const 0)))"
PAUSES_ON_TWO = PAUSES_ON_FOUR.replace("4", "2")


def headers() -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", "/a"), (":authority", "svc")])


@pytest.fixture(params=sorted(DRIVERS))
def drive(request: pytest.FixtureRequest) -> Any:
    return DRIVERS[request.param]


async def test_a_plugin_sees_the_headers_the_ones_before_it_left(load: Any, drive: Any) -> None:
    first = await load(plugin(on_request_headers=ADDS_A_HEADER,
                              strings={"k": b"x-added", "v": b"1"}), name="first")
    second = await load(plugin(on_request_headers=PAUSES_ON_FOUR), name="second")
    streams = [first.new_stream(), second.new_stream()]
    hmap = headers()
    # The second plugin paused: its index, and no action yet (the data path awaits it).
    assert drive(streams, 0, REQUEST_HEADERS, hmap, True, None) == (1, None)
    assert hmap.get("x-added") == "1"
    assert streams[1].ctx.request_headers is hmap
    # After it resumes, the phase goes on after it: nothing is left, all continued.
    assert drive(streams, 2, REQUEST_HEADERS, hmap, True, None) is None
    for stream in streams:
        stream.finish()


async def test_every_plugin_continuing_answers_none(load: Any, drive: Any) -> None:
    hosts = [await load(plugin(), name=f"p{i}") for i in range(3)]
    streams = [h.new_stream() for h in hosts]
    hmap = HeaderMap([(":status", "404"), ("server", "up")])
    assert drive(streams, 0, RESPONSE_HEADERS, hmap, False, 404) is None
    for stream in streams:
        assert stream.ctx.response_headers is hmap
        assert stream.ctx.response_code == 404
        assert stream.ctx.response_code_details == "via_upstream"
        stream.finish()


async def test_the_body_is_one_buffer_and_its_size_is_passed(load: Any, drive: Any) -> None:
    first, second = await load(plugin(), name="first"), await load(
        plugin(on_response_body=PAUSES_ON_TWO), name="second")
    streams = [first.new_stream(), second.new_stream()]
    body = Buffer(bytearray(b"ok"), mutable=True)
    assert drive(streams, 0, RESPONSE_BODY, body, True, None) == (1, None)
    assert streams[0].ctx.response_body is body and streams[1].ctx.response_body is body
    for stream in streams:
        stream.finish()


async def test_a_trap_answers_the_plugins_failure_policy(load: Any, drive: Any) -> None:
    ok = await load(plugin(), name="ok")
    trapping = await load(plugin(on_request_headers="(unreachable)"), name="trapping")
    streams = [ok.new_stream(), trapping.new_stream(), ok.new_stream()]
    index, action = drive(streams, 0, REQUEST_HEADERS, headers(), True, None)
    assert index == 1 and isinstance(action, LocalReply) and action.status == 503
    # The stream that trapped is out; the next one was not called.
    assert streams[2].ctx.request_headers is None
    assert drive(streams, 2, REQUEST_HEADERS, headers(), True, None) is None
    for stream in streams:
        stream.finish()


async def test_streams_already_finished_continue(load: Any, drive: Any) -> None:
    host = await load(plugin(on_request_headers="(unreachable)"))
    stream = host.new_stream()
    stream.finish()
    assert drive([stream], 0, REQUEST_HEADERS, headers(), True, None) is None


def test_an_unknown_phase_is_refused() -> None:
    if drive_phase is drive_phase_py:
        pytest.skip("the ctypes crossing has no compiled driver")
    with pytest.raises(ValueError, match="unknown phase 7"):
        drive_phase([], 0, 7, headers(), True, None)

