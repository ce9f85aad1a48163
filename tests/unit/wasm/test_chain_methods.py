"""`PluginChain`'s start and phases: the compiled methods (`_chain.h`) against the class's
own Python definitions, over the same plugins and requests.

Where the compiled driver runs, the first use of the wasm package puts C methods on
`PluginChain` for `start` and the three per-request phases; `PYTHON_CHAIN_METHODS` keeps
the definitions they replace. Each test runs once per implementation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from meshgate.gateway import wasm
from meshgate.gateway.filters import PYTHON_CHAIN_METHODS, PluginChain, _wasm

from .test_phases import call
from .wat import plugin

_wasm()  # installs the compiled methods where the driver runs


class Python:
    """The reference, bound to a chain as the class's own methods would be."""

    start = PYTHON_CHAIN_METHODS["start"].__get__(None, PluginChain)

    @staticmethod
    def phase(chain: PluginChain, name: str) -> Any:
        return PYTHON_CHAIN_METHODS[name].__get__(chain)


class Compiled:
    start = PluginChain.start

    @staticmethod
    def phase(chain: PluginChain, name: str) -> Any:
        return getattr(chain, name)


@pytest.fixture(params=["compiled", "python"])
def impl(request: pytest.FixtureRequest) -> Any:
    if request.param == "compiled" and wasm.compile_chain is None:
        pytest.skip("the compiled driver is not in use")
    return Compiled if request.param == "compiled" else Python


STRINGS = {"path": b":path", "newpath": b"/b", "status": b":status", "201": b"201",
           "odd": "²".encode(), "word": b"abc", "k": b"x-seen", "v": b"yes", "new": b"NEW"}
SETS_PATH = call("proxy_replace_header_map_value", 0, "path", "newpath") + " (i32.const 0)"
MARKS = call("proxy_add_header_map_value", 2, "k", "v") + " (i32.const 0)"
EDITS_BODY = ("(drop (call $proxy_set_buffer_bytes (i32.const 1) (i32.const 0) (i32.const 2) "
              "@new #new)) (i32.const 0)")


def sets_status(value: str) -> str:
    return call("proxy_replace_header_map_value", 2, "status", value) + " (i32.const 0)"


def request(**headers: str) -> Any:
    return make_mocked_request("GET", "/a", headers={"Host": "svc", **headers})


async def test_a_settled_request_carries_the_plugins_edits(load: Any, impl: Any) -> None:
    first = await load(plugin(on_request_headers=SETS_PATH, on_response_headers=MARKS,
                              strings=STRINGS), name="first")
    second = await load(plugin(on_response_headers=sets_status("201"),
                               on_response_body=EDITS_BODY, strings=STRINGS), name="second")
    req = request()
    chain = impl.start([first, second], req, None, 1024, None)
    assert type(chain) is PluginChain and chain.limit == 1024
    assert [s.host for s in chain.streams] == [first, second]
    assert chain.reversed_streams == chain.streams[::-1]
    up: CIMultiDict[str] = CIMultiDict(req.headers)
    assert impl.phase(chain, "begin_request_headers")("GET", "/a", up, req) is None
    assert chain.path == "/b" and chain.status is None and not chain.responded
    headers: CIMultiDict[str] = CIMultiDict([("Server", "up")])
    assert impl.phase(chain, "begin_response_headers")(200, headers) is None
    # The response runs last plugin first: the status is set, then the header added.
    assert chain.responded and chain.status == 201
    assert list(headers.items()) == [("Server", "up"), ("x-seen", "yes")]
    assert impl.phase(chain, "begin_whole_response_body")(b"ok body") == b"NEW body"
    chain.finish()


@pytest.mark.parametrize("value, status", [("odd", None), ("word", None), ("201", 201)])
async def test_a_status_that_is_no_number_keeps_the_upstreams(load: Any, impl: Any,
                                                              value: str,
                                                              status: int | None) -> None:
    """`²` is a digit to str.isdigit, but no number to int(): it must not fail the
    response."""
    host = await load(plugin(on_response_headers=sets_status(value), strings=STRINGS))
    req = request()
    chain = impl.start([host], req, None, 1024, None)
    assert impl.phase(chain, "begin_response_headers")(200, CIMultiDict()) is None
    assert chain.status == status
    chain.finish()


async def test_the_stream_info_holds_what_the_request_carries(load: Any, impl: Any) -> None:
    host = await load(plugin(strings=STRINGS))
    req = request(**{"x-request-id": "r-7"})
    span = object()
    chain = impl.start([host], req, span, 64, ("00-ab-cd-01", ""), "api", "backend")
    info = chain.streams[0].ctx.info
    assert (info.request_id, info.traceparent, info.tracestate) == ("r-7", "00-ab-cd-01", None)
    assert (info.span, info.route_name, info.cluster_name) == (span, "api", "backend")
    assert info.connection is req.transport and info.start_time_ns > 0
    chain.finish()
    # Keywords, and no trace context: the same chain.
    bare = impl.start([host], request(), None, 64, None, route_name="r", cluster_name="c")
    info = bare.streams[0].ctx.info
    assert (info.request_id, info.traceparent, info.route_name, info.cluster_name) == (
        "", None, "r", "c")
    bare.finish()


async def test_a_paused_phase_leaves_the_rest_to_await(load: Any, impl: Any) -> None:
    pauser = await load(plugin(on_request_headers=SETS_PATH[:-len("(i32.const 0)")]
                               + "(i32.const 1)", on_response_body="(i32.const 1)",
                               strings=STRINGS), name="pauser")
    req = request()
    chain = impl.start([pauser], req, None, 1024, None)
    rest = impl.phase(chain, "begin_request_headers")("GET", "/a", CIMultiDict(), req)
    assert rest is not None and chain.path is None  # the edit lands when the phase ends
    waiting = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    chain.streams[0].ctx.wake()
    await waiting
    assert chain.path == "/b"
    body = impl.phase(chain, "begin_whole_response_body")(b"held")
    assert not isinstance(body, bytes)
    waiting = asyncio.ensure_future(body)
    await asyncio.sleep(0)
    chain.streams[0].ctx.wake()
    assert await waiting == b"held"
    chain.finish()


def test_wrong_arguments_are_refused() -> None:
    if wasm.compile_chain is None:
        pytest.skip("the compiled driver is not in use")
    chain = PluginChain([], 0)
    with pytest.raises(TypeError, match="begin_request_headers"):
        chain.begin_request_headers("GET", "/a")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="begin_response_headers"):
        chain.begin_response_headers(200)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        PluginChain.begin_whole_response_body(object(), b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a plain slotted class|template"):
        wasm.compile_chain(object(), PYTHON_CHAIN_METHODS["start"].__func__)
