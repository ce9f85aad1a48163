"""`drive_phase`, `finish_streams` and `finish_across`: a listener's plugins driven a
phase at a time.

The data path (`PluginChain`) runs each phase of a request with one call, and the closing
callbacks of a batch of requests with one more. Both the compiled driver and its Python
references (`drive_phase_py`, `finish_streams_py`, `finish_across_py`) are checked here,
against the same plugins.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from meshgate.gateway.wasm import (
    REQUEST_HEADERS,
    RESPONSE_BODY,
    RESPONSE_HEADERS,
    Buffer,
    HeaderMap,
    LocalReply,
    PluginHost,
    drive_phase,
    finish_across,
    finish_streams,
)
from meshgate.gateway.wasm.stream import drive_phase_py, finish_across_py, finish_streams_py

from .wat import log_info, plugin

DRIVERS = {"compiled or ctypes default": (drive_phase, finish_streams, finish_across),
           "python": (drive_phase_py, finish_streams_py, finish_across_py)}

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
def driver(request: pytest.FixtureRequest) -> tuple[Any, Any, Any]:
    return DRIVERS[request.param]


@pytest.fixture
def drive(driver: tuple[Any, Any, Any]) -> Any:
    return driver[0]


@pytest.fixture
def finish(driver: tuple[Any, Any, Any]) -> Any:
    return driver[1]


@pytest.fixture
def across(driver: tuple[Any, Any, Any]) -> Any:
    return driver[2]


CLOSING = {"on_log": log_info("log"), "on_done": f"{log_info('done')} (i32.const 1)",
           "on_delete": log_info("delete"),
           "strings": {"log": b"log", "done": b"done", "delete": b"delete"}}


def closing_lines(caplog: Any, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == f"meshgate.plugin.{name}"]


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



async def test_finishing_runs_the_closing_callbacks_once(load: Any, drive: Any, finish: Any,
                                                         caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    host = await load(plugin(**CLOSING))
    streams = [host.new_stream(), host.new_stream()]
    assert drive(streams, 0, REQUEST_HEADERS, headers(), True, None) is None
    assert finish(streams) is None
    assert finish(streams) is None  # finished streams stay finished
    assert closing_lines(caplog, "probe") == ["log", "done", "delete"] * 2
    assert not host.streams  # the host forgets them


async def test_a_stream_never_called_is_finished_without_callbacks(
        load: Any, finish: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    host = await load(plugin(**CLOSING))
    stream = host.new_stream()
    assert finish([stream]) is None
    assert closing_lines(caplog, "probe") == [] and not host.streams


async def test_a_trap_while_closing_is_logged_and_the_rest_finish(
        load: Any, drive: Any, finish: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    trapping = await load(plugin(on_done="(unreachable)"), name="trapping")
    ok = await load(plugin(**CLOSING), name="ok")
    streams = [trapping.new_stream(), ok.new_stream()]
    assert drive(streams, 0, REQUEST_HEADERS, headers(), True, None) is None
    assert finish(streams) is None
    trapped = [r.getMessage() for r in caplog.records if "trapped" in r.getMessage()]
    assert len(trapped) == 1 and "plugin 'trapping'" in trapped[0]
    assert "in proxy_on_done" in trapped[0]
    assert trapping.vm.broken
    assert closing_lines(caplog, "ok") == ["log", "done", "delete"]


@pytest.fixture
async def unrecordable_trap(load: Any, caplog: Any,
                            monkeypatch: pytest.MonkeyPatch) -> tuple[PluginHost, PluginHost]:
    """A plugin that traps in on_log, where recording the trap fails, and one that logs
    its three closing callbacks."""
    caplog.set_level(logging.INFO)
    trapping = await load(plugin(on_log="(unreachable)"), name="trapping")
    ok = await load(plugin(**CLOSING), name="ok")

    def broken_trapped(host: PluginHost, callback: str, exc: Exception) -> None:
        raise RuntimeError(f"cannot record the trap in {callback}")

    monkeypatch.setattr(PluginHost, "trapped", broken_trapped)
    return trapping, ok


async def test_an_error_while_closing_is_returned_and_the_rest_finish(
        unrecordable_trap: tuple[PluginHost, PluginHost], drive: Any, finish: Any,
        caplog: Any) -> None:
    trapping, ok = unrecordable_trap
    streams = [trapping.new_stream(), ok.new_stream()]
    assert drive(streams, 0, REQUEST_HEADERS, headers(), True, None) is None
    errors = finish(streams)
    assert [str(e) for e in errors] == ["cannot record the trap in proxy_on_log"]
    assert closing_lines(caplog, "ok") == ["log", "done", "delete"]


async def test_a_batch_closes_plugin_by_plugin_across_its_requests(
        load: Any, drive: Any, across: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    first = await load(plugin(**CLOSING), name="first")
    second = await load(plugin(**CLOSING), name="second")
    # Two requests through both plugins, and one whose listener had only the first.
    requests = [[first.new_stream(), second.new_stream()],
                [first.new_stream(), second.new_stream()], [first.new_stream()]]
    for streams in requests:
        assert drive(streams, 0, REQUEST_HEADERS, headers(), True, None) is None
    assert across(requests) is None
    order = [r.name.rsplit(".", 1)[1] for r in caplog.records
             if r.name.startswith("meshgate.plugin.")]
    assert order == ["first"] * 9 + ["second"] * 6
    assert closing_lines(caplog, "first") == ["log", "done", "delete"] * 3
    assert not first.streams and not second.streams
    assert across([]) is None


async def test_an_error_while_closing_a_batch_is_returned_and_the_rest_finish(
        unrecordable_trap: tuple[PluginHost, PluginHost], drive: Any, across: Any,
        caplog: Any) -> None:
    trapping, ok = unrecordable_trap
    requests = [[trapping.new_stream(), ok.new_stream()], [ok.new_stream()]]
    for streams in requests:
        assert drive(streams, 0, REQUEST_HEADERS, headers(), True, None) is None
    errors = across(requests)
    assert [str(e) for e in errors] == ["cannot record the trap in proxy_on_log"]
    assert closing_lines(caplog, "ok") == ["log", "done", "delete"] * 2
    assert not ok.streams and not trapping.streams
