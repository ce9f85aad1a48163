"""`PluginChain`, the data path's side of the plugins, over an aiohttp request.

The integration suite sends real HTTP through it; here each phase is checked on its own:
header names as a plugin sees them, edits copied back, replies, and the closing row.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, istr

from meshgate.gateway.filters import (
    FinishBatch,
    PluginChain,
    PluginReplied,
    QueuedPhase,
    RequestBatch,
    _stream_info,
)
from meshgate.gateway.metrics import SidecarMetrics
from meshgate.gateway.wasm import HeaderMap, LiveHeaderMap
from meshgate.gateway.wasm.abi import Status
from meshgate.gateway.wasm.context import RootContext, StreamContext
from meshgate.gateway.wasm.properties import (
    _EVERY_REQUEST,
    PluginIdentity,
    _stream_property,
    get_property,
)

from .wat import log_info, plugin

# 403 unless the request has `x-mixed` (asked for in lower case, as plugins do).
NEEDS_X_MIXED = """
  (if (result i32) (i32.eqz (call $proxy_get_header_map_value (i32.const 0) @k #k
                                  (i32.const 0) (i32.const 4)))
      (then (i32.const 0))
      (else (drop (call $proxy_send_local_response (i32.const 403) (i32.const 0)
                        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                        (i32.const 0) (i32.const -1)))
            (i32.const 1)))"""
# Adds `x-seen: yes` to the response headers.
MARKS_RESPONSE = """
  (drop (call $proxy_add_header_map_value (i32.const 2) @k #k @v #v)) (i32.const 0)"""


async def chain_of(load: Any, headers: dict[str, str]) -> tuple[PluginChain, Any]:
    gate = await load(plugin(on_request_headers=NEEDS_X_MIXED, strings={"k": b"x-mixed"}),
                      name="gate")
    marker = await load(plugin(on_response_headers=MARKS_RESPONSE, on_log=log_info("log"),
                               strings={"k": b"x-seen", "v": b"yes", "log": b"closed"}),
                        name="marker")
    request = make_mocked_request("GET", "/a", headers=headers)
    return PluginChain.start([gate, marker], request, None, 1024, None), request


async def test_header_names_reach_plugins_in_lower_case(load: Any) -> None:
    chain, request = await chain_of(load, {"Host": "svc", "X-Mixed": "1"})
    up = CIMultiDict(request.headers)
    await chain.request_headers("GET", "/a", up, request)
    assert chain.path is None  # nothing edited: the data path keeps its own headers
    chain.finish()


async def test_a_reply_from_a_plugin_stops_the_request(load: Any) -> None:
    chain, request = await chain_of(load, {"Host": "svc"})
    with pytest.raises(PluginReplied) as replied:
        await chain.request_headers("GET", "/a", CIMultiDict(request.headers), request)
    assert replied.value.reply.status == 403
    chain.finish()


async def test_response_edits_are_copied_back_and_the_body_kept(load: Any,
                                                               caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    chain, request = await chain_of(load, {"Host": "svc", "x-mixed": "1"})
    await chain.request_headers("GET", "/a", CIMultiDict(request.headers), request)
    headers = CIMultiDict([("Content-Type", "text/plain"), ("Server", "up")])
    await chain.response_headers(200, headers)
    # The plugin's edit replayed: the upstream's names keep their case, as without edits.
    assert list(headers.items()) == [("Content-Type", "text/plain"), ("Server", "up"),
                                     ("x-seen", "yes")]
    assert chain.status is None  # no edit named :status: the data path keeps its own
    assert await chain.whole_response_body(b"hello") == b"hello"
    chain.finish()
    chain.finish()  # once only
    assert [r.getMessage() for r in caplog.records
            if r.name == "meshgate.plugin.marker"] == ["closed"]


async def test_a_phase_settles_at_once_unless_a_plugin_pauses(load: Any) -> None:
    """The data path's `begin_*` calls: when every plugin decides at once they answer
    None (the body, for the whole body); a plugin that pauses leaves an awaitable for the
    rest of the phase. Either way the edits land in the data path's headers as they are
    made."""
    marker = await load(plugin(on_response_headers=MARKS_RESPONSE,
                               strings={"k": b"x-seen", "v": b"yes"}), name="marker")
    pauser = await load(plugin(
        on_response_headers="(drop (call $proxy_add_header_map_value (i32.const 2) @k #k "
                            "@v #v)) (i32.const 1)",
        strings={"k": b"x-paused", "v": b"yes"}), name="pauser")
    request = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    quick = PluginChain.start([marker], request, None, 1024, None)
    assert quick.begin_request_headers("GET", "/a", CIMultiDict(), request) is None
    headers: CIMultiDict[str] = CIMultiDict()
    assert quick.begin_response_headers(200, headers) is None
    assert headers["x-seen"] == "yes"
    assert quick.begin_whole_response_body(b"body") == b"body"
    quick.finish()

    paused = PluginChain.start([pauser], request, None, 1024, None)
    headers = CIMultiDict()
    rest = paused.begin_response_headers(200, headers)
    assert rest is not None and headers["x-paused"] == "yes"
    waiting = asyncio.ensure_future(rest)
    await asyncio.sleep(0)  # the chain now waits for the plugin
    paused.streams[0].ctx.wake()
    await waiting
    assert headers.getall("x-paused") == ["yes"] and paused.status is None
    paused.finish()


def plugin_lines(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("meshgate.plugin.")]


async def test_request_batch_runs_a_loop_pass_of_request_phases_on_the_next_pass(
        load: Any, caplog: Any) -> None:
    """Requests reaching their request headers while other work is ready this pass wait
    for the next one, where the batch runs their phases in a row, in the order they came;
    each request then gets what its own phase answered: settled, a reply, or the rest of
    a paused phase to await."""
    caplog.set_level(logging.INFO)
    gate = await load(plugin(on_request_headers=f"{log_info('m')} {NEEDS_X_MIXED}",
                             strings={"k": b"x-mixed", "m": b"gate"}), name="gate")
    pauser = await load(plugin(on_request_headers=f"{log_info('m')} (i32.const 1)",
                               strings={"m": b"pauser"}), name="pauser")
    metrics = SidecarMetrics()
    batch = RequestBatch(metrics.plugin_request_batches)
    allowed = make_mocked_request("GET", "/a", headers={"Host": "svc", "x-mixed": "1"})
    refused = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    chains = [PluginChain.start([gate], allowed, None, 1024, None),
              PluginChain.start([gate], refused, None, 1024, None),
              PluginChain.start([gate, pauser], allowed, None, 1024, None)]
    requests = [allowed, refused, allowed]

    async def handler(chain: PluginChain, request: Any) -> Any:
        phase = batch.begin_request_headers(chain, "GET", "/a",
                                            CIMultiDict(request.headers), request)
        assert phase.__class__ is QueuedPhase  # another handler is ready this pass
        return await phase  # type: ignore[misc]

    handlers = [asyncio.ensure_future(handler(c, r))
                for c, r in zip(chains, requests, strict=True)]
    await asyncio.sleep(0)  # the handlers' pass: each queues its phase
    assert len(batch) == 3 and plugin_lines(caplog) == []
    await asyncio.sleep(0)  # the next pass: the batch, then the handlers
    assert plugin_lines(caplog) == ["gate", "gate", "gate", "pauser"]
    assert len(batch) == 0
    assert await handlers[0] is None
    refusal = await handlers[1]  # the reply is carried out where the rest is awaited
    with pytest.raises(PluginReplied) as replied:
        await refusal
    assert replied.value.reply.status == 403
    rest = await handlers[2]
    assert rest is not None  # the pauser paused: the rest of the phase is the handler's
    waiting = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    chains[2].streams[1].ctx.wake()
    await waiting
    name = "meshgate_sidecar_plugin_request_batch_requests"
    assert (metrics.registry.get_sample_value(f"{name}_count"),
            metrics.registry.get_sample_value(f"{name}_sum")) == (1, 3)
    for chain in chains:
        chain.finish()


async def test_a_lone_request_runs_its_request_phase_at_once(load: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    gate = await load(plugin(on_request_headers=f"{log_info('m')} {NEEDS_X_MIXED}",
                             strings={"k": b"x-mixed", "m": b"gate"}), name="gate")
    batch = RequestBatch()
    request = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    chain = PluginChain.start([gate], request, None, 1024, None)
    loop = asyncio.get_running_loop()
    for _ in range(10):  # let whatever else is ready run first
        if not loop._ready:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0)
    rest = batch.begin_request_headers(chain, "GET", "/a", CIMultiDict(request.headers),
                                       request)
    # The phase ran here, nothing waited for a pass: what is left is the plugin's reply.
    assert plugin_lines(caplog) == ["gate"] and len(batch) == 0
    assert rest is not None and rest.__class__ is not QueuedPhase
    with pytest.raises(PluginReplied):
        await rest
    chain.finish()


async def test_after_a_batch_of_one_the_next_phases_run_at_once(load: Any) -> None:
    """A batch that found no other request cost its request a pass for nothing: under a
    light load the next phases run at once, then the batch tries again."""
    gate = await load(plugin(on_request_headers=NEEDS_X_MIXED, strings={"k": b"x-mixed"}),
                      name="gate")
    batch = RequestBatch()
    request = make_mocked_request("GET", "/a", headers={"Host": "svc", "x-mixed": "1"})
    loop = asyncio.get_running_loop()

    chains: list[PluginChain] = []

    def begin() -> Any:
        loop.call_soon(lambda: None)  # other work is ready this pass
        chains.append(PluginChain.start([gate], request, None, 1024, None))
        return batch.begin_request_headers(chains[-1], "GET", "/a",
                                           CIMultiDict(request.headers), request)

    alone = begin()
    assert alone.__class__ is QueuedPhase
    assert await alone is None  # the batch held it alone
    answers = [begin() for _ in range(RequestBatch.AT_ONCE_AFTER_ALONE)]
    assert answers == [None] * RequestBatch.AT_ONCE_AFTER_ALONE  # ran at once, settled
    assert len(batch) == 0
    again = begin()
    assert again.__class__ is QueuedPhase and await again is None
    for chain in chains:
        chain.finish()


async def test_an_error_in_a_batched_phase_is_raised_in_its_own_request_only(
        load: Any) -> None:
    gate = await load(plugin(on_request_headers=NEEDS_X_MIXED, strings={"k": b"x-mixed"}),
                      name="gate")
    batch = RequestBatch()
    request = make_mocked_request("GET", "/a", headers={"Host": "svc", "x-mixed": "1"})
    good = PluginChain.start([gate], request, None, 1024, None)

    class Failing:  # a chain whose phase fails, as a bug in the data path would
        @staticmethod
        def begin_request_headers(*args: Any) -> None:
            raise RuntimeError("the phase failed")

    async def handler(chain: Any) -> Any:
        phase = batch.begin_request_headers(chain, "GET", "/a",
                                            CIMultiDict(request.headers), request)
        assert phase.__class__ is QueuedPhase
        return await phase  # type: ignore[misc]

    asyncio.get_running_loop().call_soon(lambda: None)  # other work ready: batch
    handlers = [asyncio.ensure_future(handler(Failing())),
                asyncio.ensure_future(handler(good))]
    with pytest.raises(RuntimeError, match="the phase failed"):
        await handlers[0]
    assert await handlers[1] is None
    good.finish()


# Traps when the request has `x-boom`; otherwise continues.
TRAPS_ON_X_BOOM = """
  (if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) @k #k
                     (i32.const 0) (i32.const 4)))
      (then (unreachable)))
  (i32.const 0)"""


async def test_a_trap_in_a_batch_fails_only_the_request_that_trapped(load: Any) -> None:
    """The batch's requests opened their streams before any of their phases ran: one
    trapping must not fail the others, which had not reached the plugin yet. Each of them
    goes to the VM recreated after the trap, as a request opened after it would."""
    bomb = await load(plugin(on_request_headers=TRAPS_ON_X_BOOM, strings={"k": b"x-boom"}),
                      name="bomb")
    batch = RequestBatch()
    calm = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    boom = make_mocked_request("GET", "/a", headers={"Host": "svc", "x-boom": "1"})
    requests = [calm, boom, calm, calm]
    chains = [PluginChain.start([bomb], r, None, 1024, None) for r in requests]

    async def handler(chain: PluginChain, request: Any) -> Any:
        phase = batch.begin_request_headers(chain, "GET", "/a",
                                            CIMultiDict(request.headers), request)
        assert phase.__class__ is QueuedPhase
        rest = await phase  # type: ignore[misc]
        if rest is not None:
            await rest
        return "served"

    asyncio.get_running_loop().call_soon(lambda: None)  # other work ready: batch
    outcomes = await asyncio.gather(
        *(handler(c, r) for c, r in zip(chains, requests, strict=True)),
        return_exceptions=True)
    assert outcomes[0] == outcomes[2] == outcomes[3] == "served"
    assert isinstance(outcomes[1], PluginReplied) and outcomes[1].reply.status == 503
    assert not bomb.vm.broken  # recreated for the requests after the trap
    for chain in chains:
        chain.finish()


async def test_a_queued_phase_its_pass_missed_runs_when_awaited(load: Any,
                                                                caplog: Any) -> None:
    """A batch's pass that failed before a request's phase must not let the request on
    unchecked: awaiting the phase runs it."""
    caplog.set_level(logging.INFO)
    gate = await load(plugin(on_request_headers=f"{log_info('m')} {NEEDS_X_MIXED}",
                             strings={"k": b"x-mixed", "m": b"gate"}), name="gate")
    request = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    chain = PluginChain.start([gate], request, None, 1024, None)
    phase = QueuedPhase(chain, ("GET", "/a", CIMultiDict(request.headers), request))
    rest = await phase
    assert plugin_lines(caplog) == ["gate"]
    with pytest.raises(PluginReplied):
        await rest  # type: ignore[misc]
    chain.finish()


async def test_finish_batch_closes_a_loop_pass_of_requests_after_it_plugin_by_plugin(
        load: Any, caplog: Any) -> None:
    """The data path queues each plugged request's closing callbacks: they run on the next
    loop pass, all the queued requests' together, each plugin's for every request before
    the next plugin's, and only then is what each request holds released."""
    caplog.set_level(logging.INFO)
    first = await load(plugin(on_log=log_info("m"), strings={"m": b"first"}), name="first")
    second = await load(plugin(on_log=log_info("m"), strings={"m": b"second"}), name="second")
    request = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    released: list[tuple[int, int]] = []

    def closed() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("meshgate.plugin.")]

    class Holder:  # the data path's ConfigHolder, as the batch sees it
        @staticmethod
        def release(config: Any) -> None:
            config.inflight -= 1
            released.append((config.i, len(closed())))

    metrics = SidecarMetrics()
    batch = FinishBatch(Holder(), metrics.plugin_finish_batches)  # type: ignore[arg-type]

    def batches() -> tuple[float | None, float | None]:  # (count, sum) on /metrics
        name = "meshgate_sidecar_plugin_finish_batch_requests"
        return (metrics.registry.get_sample_value(f"{name}_count"),
                metrics.registry.get_sample_value(f"{name}_sum"))
    configs = [SimpleNamespace(i=i, inflight=1) for i in range(3)]

    def started(hosts: list[Any]) -> PluginChain:
        chain = PluginChain.start(hosts, request, None, 1024, None)
        assert chain.begin_request_headers("GET", "/a", CIMultiDict(), request) is None
        return chain

    for config in configs:
        batch.add(started([first, second]), config)
    assert len(batch) == 3 and closed() == [] and released == []  # not on the request's path
    assert [c.inflight for c in configs] == [2, 2, 2]  # held past the request's own release
    assert len(first.streams) == len(second.streams) == 3
    await asyncio.sleep(0)  # one loop pass
    assert closed() == ["first"] * 3 + ["second"] * 3
    assert released == [(0, 6), (1, 6), (2, 6)]  # after every callback of the batch
    assert [c.inflight for c in configs] == [1, 1, 1]
    assert len(batch) == 0 and not first.streams and not second.streams
    assert batches() == (1, 3)

    batch.add(started([second]), SimpleNamespace(i=3, inflight=1))
    batch.flush()  # at shutdown: at once, before the hosts close
    assert closed()[-1] == "second" and len(batch) == 0 and not second.streams
    await asyncio.sleep(0)  # the pass scheduled by add() finds nothing left to do
    assert closed().count("second") == 4
    assert batches() == (2, 4)  # the empty pass is no batch


async def test_finish_batch_holds_a_snapshot_once_for_its_run_of_requests(load: Any) -> None:
    """Requests on the same config snapshot share one hold of it until the batch has run;
    another snapshot in between takes a hold of its own."""
    host = await load(plugin(), name="p")
    request = make_mocked_request("GET", "/a", headers={"Host": "svc"})
    released: list[int] = []

    class Holder:
        @staticmethod
        def release(config: Any) -> None:
            config.inflight -= 1
            released.append(config.i)

    batch = FinishBatch(Holder())  # type: ignore[arg-type]
    old, new = SimpleNamespace(i=0, inflight=1), SimpleNamespace(i=1, inflight=1)
    for config in (old, old, new, new, new, old):
        batch.add(PluginChain.start([host], request, None, 1024, None), config)
    assert (old.inflight, new.inflight) == (3, 2) and len(batch) == 6
    assert len(host.streams) == 6
    await asyncio.sleep(0)
    assert released == [0, 1, 0] and (old.inflight, new.inflight) == (1, 1)
    assert not host.streams


EDITS = [("set", "X-A", "1"), ("add", "x-b", "2"), ("set", "x-b", "3"), ("remove", "X-C", None),
         ("add", "x-a", "4"), ("set", "x-a", "5"), ("set", ":path", "/b"), ("add", "New", "6"),
         ("remove", "x-missing", None), ("set", "x-c", "7")]


@pytest.mark.parametrize("count", range(len(EDITS) + 1))
def test_a_live_map_edits_the_headers_as_a_header_map_would(count: int) -> None:
    """The data path shows its plugins a `LiveHeaderMap` over its own headers, which
    their edits change in place; what they see and leave must be what a `HeaderMap` built
    from the same headers would give, edit for edit."""
    start = [("X-A", "0"), ("x-b", "0"), ("X-C", "0"), ("x-b", "1"), ("x-c", "2")]
    hmap = HeaderMap([(":path", "/a"), *start])
    headers = CIMultiDict(start)
    live = LiveHeaderMap([(":path", "/a")], headers)
    for op, name, value in EDITS[:count]:
        for m in (hmap, live):
            getattr(m, op)(name, *([value] if value is not None else []))
    assert live.items() == hmap.items() and list(live) == list(hmap) and live == hmap
    assert len(live) == len(hmap)
    for name in ("x-a", "X-B", "x-c", "new", ":path", "x-missing"):
        assert live.get(name) == hmap.get(name)
        assert live.get_all(name) == hmap.get_all(name)
        assert live.joined(name) == hmap.joined(name)
    # The edits are in the data path's headers, pseudo-headers left out.
    assert [(k.lower(), v) for k, v in headers.items()] == [
        kv for kv in hmap.items() if not kv[0].startswith(":")]
    assert live.touched == any(name.startswith(":") for _, name, _ in EDITS[:count])


def test_a_live_map_replaced_whole_keeps_its_pseudo_headers_first() -> None:
    headers = CIMultiDict([("X-A", "0")])
    live = LiveHeaderMap([(":path", "/a")], headers)
    live.replace_all([("X-B", "1"), (":Path", "/b"), ("x-c", "2")])
    assert live.touched and live.get(":path") == "/b"
    assert live.items() == [(":path", "/b"), ("x-b", "1"), ("x-c", "2")]
    assert list(headers.items()) == [("x-b", "1"), ("x-c", "2")]


def test_a_live_map_shows_names_lower_cased_as_a_header_map_does() -> None:
    """By str.lower's rules, also for istr and non-ASCII names; values kept."""
    pairs = [("Host", "a"), ("x-low", "b"), (istr("X-Istr"), "c"), ("É-Accent", "d"),
             ("x-low", "E")]
    live = LiveHeaderMap([(":method", "GET")], CIMultiDict(pairs))
    assert live.items() == HeaderMap([(":method", "GET"), *pairs]).items() == [
        (":method", "GET"), ("host", "a"), ("x-low", "b"), ("x-istr", "c"), ("é-accent", "d"),
        ("x-low", "E")]
    assert live.get("X-ISTR") == "c" and live.get("é-accent") == "d"


class Connection:
    """A transport whose address lookups are counted."""

    def __init__(self, peer: tuple[str, int] | None) -> None:
        self.peer, self.asked = peer, 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        self.asked += 1
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8080)}.get(name, default)


@pytest.mark.parametrize("peer, source", [(("10.1.2.3", 4567), b"10.1.2.3:4567"),
                                          (None, None)])
def test_addresses_are_read_from_the_connection_when_a_plugin_asks(
        peer: tuple[str, int] | None, source: bytes | None) -> None:
    connection = Connection(peer)
    request = make_mocked_request("GET", "/a", headers={"x-request-id": "r1"},
                                  transport=connection)
    connection.asked = 0  # the mocked request's own lookups
    info = _stream_info(request, None, None)
    assert connection.asked == 0  # nothing read for a plugin that never asks
    ctx = StreamContext(2, info, RootContext(b"", b""))
    ident = PluginIdentity("p", "", "", "", "")
    status, value = get_property(ctx, ident, b"source\0address")
    assert (status == Status.OK and value == source) or (source is None and
                                                         status == Status.NOT_FOUND)
    assert get_property(ctx, ident, b"destination\0port") == (Status.OK,
                                                              (8080).to_bytes(8, "little"))
    get_property(ctx, ident, b"source\0port")
    assert connection.asked == 2 + (peer is None)  # found addresses are kept
    assert get_property(ctx, ident, b"request\0id") == (Status.OK, b"r1")


def test_plugins_see_the_route_and_cluster_the_request_took() -> None:
    request = make_mocked_request("GET", "/a", headers={})
    ctx = StreamContext(2, _stream_info(request, None, None, "api", "backend"),
                        RootContext(b"", b""))
    ident = PluginIdentity("p", "", "", "", "")
    assert get_property(ctx, ident, b"xds\0route_name") == (Status.OK, b"api")
    assert get_property(ctx, ident, b"xds\0cluster_name") == (Status.OK, b"backend")


@pytest.mark.parametrize("headers, peer", [([(":path", "/a?b")], ("10.1.2.3", 4567)),
                                           ([], None)])
def test_the_every_request_properties_answer_what_the_full_table_answers(
        headers: list[tuple[str, str]], peer: tuple[str, int] | None) -> None:
    """`get_property` answers a few names from a shortcut table; each must give what the
    path's parse through `_stream_property` gives, found or not."""
    request = make_mocked_request("GET", "/a", headers={}, transport=Connection(peer))
    ident = PluginIdentity("p", "", "", "", "")
    for raw_path in _EVERY_REQUEST:
        ctx = StreamContext(2, _stream_info(request, None, None), RootContext(b"", b""))
        ctx.request_headers = HeaderMap(headers)
        twin = StreamContext(3, _stream_info(request, None, None), RootContext(b"", b""))
        twin.request_headers = HeaderMap(headers)
        value = _stream_property(twin, ident, raw_path.decode().split("\0"))
        expected = (Status.OK, value) if value is not None else (Status.NOT_FOUND, b"")
        assert get_property(ctx, ident, raw_path) == expected
        # Outside a stream there is no such property.
        assert get_property(RootContext(b"", b""), ident, raw_path) == (Status.NOT_FOUND, b"")
