"""The compiled stream driver (decision 1100): `HttpStream._call` and
`PluginHost._invoke_all` in C for the common case.

What a stream answers is checked by every lifecycle test (tests/run_all.sh runs
tests/unit/wasm through the compiled crossings, with this driver, and through ctypes,
with the Python one). Here: a plain request stays in C, every case the driver leaves to
Python gives the Python answer, the host's state after a trap is the one Python leaves,
and the driver keeps no reference it should not.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections import Counter
from typing import Any

import pytest

from meshgate.gateway.wasm import (
    CONTINUE,
    REQUEST_HEADERS,
    RESPONSE_BODY,
    RESPONSE_HEADERS,
    STOP_AND_BUFFER,
    Buffer,
    HeaderMap,
    LocalReply,
    StreamInfo,
)
from meshgate.gateway.wasm import stream as stream_module
from meshgate.gateway.wasm._rawcall import COMPILED_DRIVER
from meshgate.gateway.wasm.context import StreamContext
from meshgate.gateway.wasm.host import PluginHost
from meshgate.gateway.wasm.stream import HttpStream
from meshgate.gateway.wasm.vm import DRIVER_EXPORTS

from .wat import plugin

pytestmark = pytest.mark.skipif(COMPILED_DRIVER is None,
                                reason="the ctypes crossing drives streams in Python")

BUFFER_UNTIL_END = "(if (result i32) (local.get $eos) (then (i32.const 0)) (else (i32.const 1)))"
LOCAL_REPLY_ON_PATH_B = """
  (drop (call $proxy_get_header_map_value (i32.const 0) @p #p (i32.const 0) (i32.const 4)))
  (if (result i32) (i32.eq (i32.load8_u offset=1 (i32.load (i32.const 0))) (i32.const 0x62))
      (then (drop (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0)
                        @body #body (i32.const 0) (i32.const 0) (i32.const -1)))
            (i32.const 1))
      (else (i32.const 0)))"""


@pytest.fixture
def python_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts of the Python reference methods the driver falls back to."""
    calls: Counter[str] = Counter()
    for cls, name in ((HttpStream, "_call"), (PluginHost, "_invoke_all"),
                      (PluginHost, "_invoke_each")):
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, _name: str = name, _fn: Any = original) -> Any:
            calls[_name] += 1
            return _fn(self, *args)

        monkeypatch.setattr(cls, name, wrapper)
    return calls


def request(path: str = "/a") -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", path), (":authority", "svc")])


async def one_request(host: PluginHost, path: str = "/a") -> list[Any]:
    stream = host.new_stream()
    actions = [await stream.request_headers(request(path), False),
               await stream.request_body(bytearray(b"part"), False),
               await stream.request_body(bytearray(b"part-rest"), True),
               await stream.response_headers(HeaderMap([(":status", "200")]), False),
               await stream.response_body(bytearray(b"ok"), True)]
    stream.finish()
    return actions


async def test_a_plain_request_stays_in_c_after_its_first(load: Any,
                                                          python_calls: Counter[str]) -> None:
    host = await load(plugin(on_request_body=BUFFER_UNTIL_END))
    first = await one_request(host)
    # The first stream looks each export up through Python, which fills the VM's table.
    assert python_calls["_call"] > 0 and python_calls["_invoke_all"] == 1
    python_calls.clear()
    assert await one_request(host) == first
    assert first == [CONTINUE, STOP_AND_BUFFER, CONTINUE, CONTINUE, CONTINUE]
    assert python_calls == Counter()
    # The driver's own exports are found by index in the VM's `calls`, not by name.
    calls = dict(zip(DRIVER_EXPORTS, host.vm.calls, strict=True))
    assert all(calls[name] is host.vm.funcs[name].call for name in (  # type: ignore[union-attr]
        "proxy_on_context_create", "proxy_on_request_headers", "proxy_on_response_headers",
        "proxy_on_response_body", "proxy_on_log", "proxy_on_done", "proxy_on_delete"))


async def test_streams_the_driver_leaves_to_python_answer_as_python(
        load: Any, python_calls: Counter[str]) -> None:
    host = await load(plugin(strings={"p": b":path", "body": b"no"},
                             on_request_headers=LOCAL_REPLY_ON_PATH_B), fail_open=True)
    await one_request(host)
    python_calls.clear()
    stream = host.new_stream()
    reply = await stream.request_headers(request("/b"), False)
    assert reply == LocalReply(403, [("content-type", "text/plain")], b"no", "")
    # The stream has replied: what follows is Python's no-op, never the plugin.
    assert await stream.response_headers(HeaderMap([(":status", "200")]), False) == CONTINUE
    assert python_calls["_call"] == 1
    host.vm.broken = True  # as after a trap on another stream: fail-open skips the plugin
    assert await host.new_stream().request_headers(request(), False) == CONTINUE


async def test_a_trap_leaves_the_host_as_python_does(load: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="meshgate.gateway.wasm")
    host = await load(plugin(on_response_headers="unreachable"), name="trapper")
    stream = host.new_stream()
    assert await stream.request_headers(request(), True) == CONTINUE
    vm = host.vm
    assert await stream.response_headers(HeaderMap([(":status", "200")]), True) == \
        LocalReply(503, [], b"", "wasm_fail_stream")
    assert vm.broken and vm.depth == 0 and host._effective is host.root
    assert [r.getMessage().split(": ")[0] for r in caplog.records if "trapped" in
            r.getMessage()] == [f"plugin 'trapper' (sha256 {host.spec.sha256[:12]}) "
                                "trapped in proxy_on_response_headers"]
    stream.finish()  # the VM it ran on is gone: nothing is called
    # A new VM for the next stream, which traps in the same place and has replied since.
    assert await one_request(host) == [CONTINUE, CONTINUE, CONTINUE,
                                       LocalReply(503, [], b"", "wasm_fail_stream"), CONTINUE]
    assert host.vm is not vm


async def test_a_trap_in_the_closing_row_names_its_callback(load: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="meshgate.gateway.wasm")
    host = await load(plugin(on_done="unreachable"), name="closer")
    await one_request(host)
    messages = [r.getMessage() for r in caplog.records if "trapped" in r.getMessage()]
    assert len(messages) == 1 and "trapped in proxy_on_done: " in messages[0]
    assert host._effective is host.root and host.vm.depth == 0


async def test_the_driver_is_what_the_data_path_calls() -> None:
    assert stream_module._drive is COMPILED_DRIVER.drive
    assert stream_module._invoke_all is COMPILED_DRIVER.invoke_all
    assert stream_module.drive_phase is COMPILED_DRIVER.drive_phase
    assert stream_module.finish_streams is COMPILED_DRIVER.finish_streams
    assert stream_module.finish_across is COMPILED_DRIVER.finish_across
    assert stream_module.open_streams is COMPILED_DRIVER.open_streams


@pytest.mark.parametrize("bad", [(), [()], [[], 3]])
async def test_finishing_across_takes_a_list_of_lists(bad: Any) -> None:
    with pytest.raises(TypeError, match="finish_across"):
        stream_module.finish_across(bad)


async def test_phases_and_finishing_leak_no_python_objects(load: Any) -> None:
    hosts = [await load(plugin(), name=f"p{i}") for i in range(2)]

    def one() -> None:
        streams = stream_module.open_streams(hosts, StreamInfo())
        body = Buffer(bytearray(b"ok"), mutable=True)
        assert stream_module.drive_phase(streams, 0, REQUEST_HEADERS, request(), True,
                                         None) is None
        assert stream_module.drive_phase(streams, 0, RESPONSE_HEADERS,
                                         HeaderMap([(":status", "200")]), False, 200) is None
        assert stream_module.drive_phase(streams, 0, RESPONSE_BODY, body, True, None) is None
        assert stream_module.finish_across([streams]) is None

    for _ in range(200):
        one()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            one()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, f"Python heap grew {grown} bytes over 3,000 requests"


async def test_the_driver_leaks_no_python_objects(load: Any) -> None:
    # A reference kept by mistake in C would grow Python's heap on every request.
    host = await load(plugin(on_request_body=BUFFER_UNTIL_END))
    for _ in range(200):
        await one_request(host)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            await one_request(host)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, f"Python heap grew {grown} bytes over 3,000 requests"


async def test_a_trap_survives_a_cold_type_cache(load: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Storing an attribute looks its name up in the type first, and on a type-cache miss
    # CPython clears any pending exception. A host call that changes the VM's class (so
    # its cache entries go stale) before the guest traps made the driver lose the trap
    # ("error return without exception set"): it must restore the VM with the trap aside.
    from meshgate.gateway.wasm.imports import ProxyWasmImports
    from meshgate.gateway.wasm.vm import PluginVM

    original = ProxyWasmImports.proxy_log

    def log_and_stale_the_type(self: Any, *args: int) -> Any:
        PluginVM._cold = object()  # any class attribute store invalidates its cache
        del PluginVM._cold
        return original(self, *args)

    monkeypatch.setattr(ProxyWasmImports, "proxy_log", log_and_stale_the_type)
    trap_on_b = """
      (drop (call $proxy_log (i32.const 2) @m #m))
      (drop (call $proxy_get_header_map_value (i32.const 0) @p #p (i32.const 0) (i32.const 4)))
      (if (i32.eq (i32.load8_u offset=1 (i32.load (i32.const 0))) (i32.const 0x62))
          (then unreachable))
      (i32.const 0)"""
    host = await load(plugin(strings={"m": b"deciding", "p": b":path"},
                             on_request_headers=trap_on_b))
    for _ in range(3):
        # A plain request first: the VM's exports are looked up, the next runs in C.
        assert await host.new_stream().request_headers(request("/a"), True) == CONTINUE
        assert await host.new_stream().request_headers(request("/b"), True) == \
            LocalReply(503, [], b"", "wasm_fail_stream")


async def test_attributes_are_read_as_python_reads_them(load: Any) -> None:
    # The driver reads a slot at its offset only for the exact class it resolved it on
    # (_attrs.h): a subclass that turns `_skip` into a property is read through it.
    class AlwaysSkipped(HttpStream):
        __slots__ = ()

        @property  # type: ignore[override]
        def _skip(self) -> bool:
            return True

        @_skip.setter
        def _skip(self, value: bool) -> None:
            HttpStream._skip.__set__(self, value)  # the slot underneath holds False

    host = await load(plugin(strings={"p": b":path", "body": b"no"},
                             on_request_headers=LOCAL_REPLY_ON_PATH_B))
    await one_request(host)  # the plain class first: its offsets are remembered
    reply = await host.new_stream().request_headers(request("/b"), True)
    assert isinstance(reply, LocalReply) and reply.status == 403
    skipped = AlwaysSkipped(host, host.new_stream().ctx, host.generation)
    assert await skipped.request_headers(request("/b"), True) == CONTINUE

    class SkippedByGetattribute(HttpStream):
        __slots__ = ()

        def __getattribute__(self, name: str) -> Any:
            return True if name == "_skip" else super().__getattribute__(name)

    hidden = SkippedByGetattribute(host, host.new_stream().ctx, host.generation)
    assert await hidden.request_headers(request("/b"), True) == CONTINUE


def slots(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for cls in type(obj).__mro__
            for name in getattr(cls, "__slots__", ())}


async def test_opened_streams_are_what_new_stream_makes(load: Any) -> None:
    # The compiled open_streams copies templates (_streams.h): each stream must equal the
    # one the Python reference makes, but for its context id, and be registered as open.
    hosts = [await load(plugin(), name=f"p{i}") for i in range(2)]
    info = StreamInfo(request_id="r-1")
    compiled = stream_module.open_streams(hosts, info)
    reference = stream_module.open_streams_py(hosts, info)
    for host, made, expected in zip(hosts, compiled, reference, strict=True):
        assert made.host is host and made.ctx.info is info and made.ctx.root is host.root
        assert made.ctx.id + 1 == expected.ctx.id
        assert host.streams == {made.ctx.id: made.ctx, expected.ctx.id: expected.ctx}
        assert {**slots(made), "ctx": None} == {**slots(expected), "ctx": None}
        assert {**slots(made.ctx), "id": 0} == {**slots(expected.ctx), "id": 0}
    # They run a request like any other, and close.
    assert stream_module.drive_phase(compiled, 0, REQUEST_HEADERS, request(), True,
                                     None) is None
    assert stream_module.finish_streams(compiled + reference) is None
    assert all(h.streams == {} for h in hosts)


async def test_a_host_without_a_live_vm_opens_its_stream_through_python(load: Any) -> None:
    host = await load(plugin())
    old = host.vm
    old.broken = True  # as after a trap: the reference boots a new VM for the stream
    (stream,) = stream_module.open_streams((host,), StreamInfo())
    assert host.vm is not old and stream._generation == host.generation
    assert await stream.request_headers(request(), True) == CONTINUE


def test_a_template_a_copy_could_not_equal_is_refused() -> None:
    class Shared(StreamContext):
        __slots__ = ("seen",)

        def __init__(self) -> None:
            super().__init__(0, StreamInfo(), None)  # type: ignore[arg-type]
            self.seen: list[str] = []

    class WithDict(StreamContext):
        pass

    stream = stream_module._templates()[1]
    with pytest.raises(TypeError, match="Shared.seen defaults to a list: every stream"):
        COMPILED_DRIVER.configure_streams(Shared(), stream)
    with pytest.raises(TypeError, match="WithDict cannot be a stream template"):
        COMPILED_DRIVER.configure_streams(WithDict(0, StreamInfo(), None), stream)


async def test_a_class_changed_after_its_slots_were_read_is_read_anew(
        load: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A call site keeps a slot's offset while the class's version tag holds (_attrs.h);
    # changing the class must send the next read through Python.
    host = await load(plugin(strings={"p": b":path", "body": b"no"},
                             on_request_headers=LOCAL_REPLY_ON_PATH_B))
    await one_request(host)  # every offset of the plain classes remembered
    assert isinstance(await host.new_stream().request_headers(request("/b"), True),
                      LocalReply)
    slot = HttpStream._skip
    monkeypatch.setattr(HttpStream, "_skip", property(lambda self: True, slot.__set__))
    assert await host.new_stream().request_headers(request("/b"), True) == CONTINUE


async def test_an_unreadable_vm_state_is_raised_when_opening_streams(load: Any) -> None:
    class Unreadable:
        @property
        def broken(self) -> bool:
            raise RuntimeError("VM state unreadable")

    host = await load(plugin())
    vm, host.vm = host.vm, Unreadable()
    try:
        with pytest.raises(RuntimeError, match="VM state unreadable"):
            stream_module.open_streams((host,), StreamInfo())
    finally:
        host.vm = vm
    assert host.streams == {}
