"""The compiled fast paths of the per-request host functions (decision 1000).

Their answers are checked by every host-function test (tests/unit/wasm/test_hostcalls.py
runs through them by default). Here: the common cases really stay in C, and the cases
they leave to Python (non-ASCII names, repeated names, pointers past the memory the host
last mapped) give the same results as the Python methods.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import pytest
from multidict import CIMultiDict

from meshgate.gateway.wasm import HeaderMap, LiveHeaderMap, StreamInfo
from meshgate.gateway.wasm._rawcall import CROSSING
from meshgate.gateway.wasm.abi import MetricType
from meshgate.gateway.wasm.imports import ProxyWasmImports

from .conftest import call_in
from .wat import SLOT_PTR, SLOT_SIZE, plugin

pytestmark = pytest.mark.skipif(CROSSING != "compiled", reason="the ctypes crossing has none")

ARG, ARG2 = 512, 768
FAST = ("proxy_get_header_map_value", "proxy_replace_header_map_value",
        "proxy_add_header_map_value", "proxy_remove_header_map_value",
        "proxy_get_current_time_nanoseconds", "proxy_increment_metric",
        "proxy_get_shared_data", "proxy_set_shared_data", "proxy_call_foreign_function",
        "proxy_get_property")


@pytest.fixture
async def counted(load: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Counter[str]]:
    """A probe plugin whose Python host functions count their calls (the fallbacks).
    Patched before the import table is linked: the table binds the methods then."""
    calls: Counter[str] = Counter()
    for name in FAST:
        original = getattr(ProxyWasmImports, name)

        def wrapper(self: Any, *args: int, _name: str = name, _fn: Any = original) -> Any:
            calls[_name] += 1
            return _fn(self, *args)

        monkeypatch.setattr(ProxyWasmImports, name, wrapper)
    return await load(plugin()), calls


def put(host: Any, addr: int, data: bytes) -> tuple[int, int]:
    host.vm.mem.write(addr, data)
    return addr, len(data)


def returned(host: Any) -> bytes:
    mem = host.vm.mem
    return mem.read(mem.read_u32(SLOT_PTR), mem.read_u32(SLOT_SIZE))


def stream_with(host: Any, headers: list[tuple[str, str]]) -> Any:
    stream = host.new_stream(StreamInfo())
    stream.ctx.request_headers = HeaderMap(headers)
    return stream.ctx


async def test_the_common_cases_never_reach_python(counted: Any) -> None:
    probe, calls = counted
    ctx = stream_with(probe, [(":path", "/a"), ("X-Api-Key", "k1"), ("b", "ü")])
    key, b = put(probe, ARG, b"x-API-key"), put(probe, ARG + 32, b"b")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *key, SLOT_PTR, SLOT_SIZE) == 0
    assert returned(probe) == b"k1"
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *b, SLOT_PTR, SLOT_SIZE) == 0
    assert returned(probe) == "ü".encode()
    value = put(probe, ARG2, b"caf\xc3\xa9 \xff")  # invalid UTF-8 is replaced, as read_str does
    assert call_in(probe, ctx, "proxy_replace_header_map_value", 0, *b, *value) == 0
    assert call_in(probe, ctx, "proxy_add_header_map_value", 0, *key, *value) == 0
    assert call_in(probe, ctx, "proxy_remove_header_map_value", 0, *put(probe, ARG + 64,
                                                                           b":PATH")) == 0
    assert ctx.request_headers.items() == [("x-api-key", "k1"), ("b", "café \ufffd"),
                                           ("x-api-key", "café \ufffd")]
    assert call_in(probe, ctx, "proxy_get_current_time_nanoseconds", ARG) == 0
    assert struct.unpack("<Q", probe.vm.mem.read(ARG, 8))[0] > 1_700_000_000 * 10**9
    missing = put(probe, ARG, b"x-none")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *missing, SLOT_PTR,
                   SLOT_SIZE) == 1
    assert call_in(probe, ctx, "proxy_get_header_map_value", 2, *missing, SLOT_PTR,
                   SLOT_SIZE) == 1  # no response headers yet
    assert sum(calls.values()) == 0


async def test_a_live_maps_edits_stay_in_c_and_land_in_the_data_paths_headers(
        counted: Any) -> None:
    """The data path's phases show a `LiveHeaderMap` over their own headers (decision
    2500): reads and edits of ordinary headers go to its CIMultiDict from C, and give
    what a `HeaderMap` of the same headers gives. Pseudo-header edits are Python's."""
    probe, calls = counted
    start = [("X-Api-Key", "k1"), ("b", "0"), ("B", "1"), ("c", "2")]
    headers = CIMultiDict(start)
    ctx = probe.new_stream(StreamInfo()).ctx
    ctx.request_headers = live = LiveHeaderMap([(":path", "/a")], headers)
    expected = HeaderMap([(":path", "/a"), *start])
    key, b, path = put(probe, ARG, b"x-API-key"), put(probe, ARG + 32, b"B"), put(
        probe, ARG + 64, b":PATH")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *key, SLOT_PTR, SLOT_SIZE) == 0
    assert returned(probe) == b"k1"
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *path, SLOT_PTR, SLOT_SIZE) == 0
    assert returned(probe) == b"/a"
    missing = put(probe, ARG + 96, b"x-none")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *missing, SLOT_PTR,
                   SLOT_SIZE) == 1  # NOT_FOUND
    value = put(probe, ARG2, b"caf\xc3\xa9 \xff")  # invalid UTF-8 is replaced, as read_str does
    assert call_in(probe, ctx, "proxy_replace_header_map_value", 0, *b, *value) == 0
    assert call_in(probe, ctx, "proxy_add_header_map_value", 0, *key, *value) == 0
    assert call_in(probe, ctx, "proxy_remove_header_map_value", 0,
                   *put(probe, ARG + 128, b"C")) == 0
    expected.set("b", "café \ufffd")
    expected.add("x-api-key", "café \ufffd")
    expected.remove("c")
    assert live.items() == expected.items() and not live.touched
    assert [(k.lower(), v) for k, v in headers.items()] == expected.items()[1:]
    assert sum(calls.values()) == 0
    assert call_in(probe, ctx, "proxy_replace_header_map_value", 0, *path, *value) == 0
    expected.set(":path", "café \ufffd")
    assert calls == Counter({"proxy_replace_header_map_value": 1})
    assert live.touched and live.items() == expected.items()


async def test_uncommon_cases_fall_back_to_python_with_the_same_result(counted: Any) -> None:
    probe, calls = counted
    ctx = stream_with(probe, [("é", "1"), ("a", "1"), ("a", "2"), ("c", "3")])
    accented, a = put(probe, ARG, "É".encode()), put(probe, ARG + 16, b"A")
    v = put(probe, ARG2, b"x")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *accented, SLOT_PTR,
                   SLOT_SIZE) == 0  # Python lower-cases non-ASCII names too
    assert returned(probe) == b"1"
    assert call_in(probe, ctx, "proxy_replace_header_map_value", 0, *a, *v) == 0
    assert ctx.request_headers.items() == [("é", "1"), ("a", "x"), ("c", "3")]
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, 0xFFFFFFF0, 4, SLOT_PTR,
                   SLOT_SIZE) == 6  # INVALID_MEMORY_ACCESS
    assert call_in(probe, ctx, "proxy_get_header_map_value", 9, *a, SLOT_PTR,
                   SLOT_SIZE) == 2  # BAD_ARGUMENT: past the last map type
    assert calls == Counter({"proxy_get_header_map_value": 3,
                             "proxy_replace_header_map_value": 1})


async def test_a_value_handed_out_after_the_allocator_grew_memory(counted: Any) -> None:
    probe, _ = counted
    big = "v" * (3 << 20)  # more than the probe's memory: its malloc must grow it
    ctx = stream_with(probe, [("x-big", big)])
    key = put(probe, ARG, b"x-big")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *key, SLOT_PTR, SLOT_SIZE) == 0
    assert returned(probe) == big.encode()


async def test_metrics_and_shared_data_stay_in_c_with_python_semantics(counted: Any) -> None:
    probe, calls = counted
    metrics = probe.services.metrics
    _, counter = metrics.define(int(MetricType.COUNTER), "fast_hits")
    _, gauge = metrics.define(int(MetricType.GAUGE), "fast_open")
    _, histogram = metrics.define(int(MetricType.HISTOGRAM), "fast_sizes")
    root = probe.root
    assert call_in(probe, root, "proxy_increment_metric", counter, 3) == 0
    assert call_in(probe, root, "proxy_increment_metric", counter, -1) == 2
    assert call_in(probe, root, "proxy_increment_metric", gauge, -2) == 0
    assert call_in(probe, root, "proxy_increment_metric", histogram, 1) == 2
    assert call_in(probe, root, "proxy_increment_metric", 999_999, 1) == 1
    assert metrics.get(counter) == (0, 3)
    assert metrics.get(gauge) == (0, -2)

    key, value = put(probe, ARG, b"bucket"), put(probe, ARG2, b"v1")
    slot = ARG + 100  # where get_shared_data writes the cas
    assert call_in(probe, root, "proxy_get_shared_data", *key, SLOT_PTR, SLOT_SIZE, slot) == 1
    assert call_in(probe, root, "proxy_set_shared_data", *key, *value, 0) == 0
    assert call_in(probe, root, "proxy_get_shared_data", *key, SLOT_PTR, SLOT_SIZE, slot) == 0
    assert returned(probe) == b"v1"
    cas = probe.vm.mem.read_u32(slot)
    v2 = put(probe, ARG2, b"v2")
    assert call_in(probe, root, "proxy_set_shared_data", *key, *v2, cas + 1) == 8  # mismatch
    assert call_in(probe, root, "proxy_set_shared_data", *key, *v2, cas) == 0
    assert probe.services.shared_data.get(probe.identity.vm_id, b"bucket") == (b"v2", cas + 1)
    assert sum(calls.values()) == 0


async def test_foreign_calls_reach_the_function_without_the_python_marshalling(
    counted: Any,
) -> None:
    probe, calls = counted
    seen: list[tuple[bytes, Any]] = []

    def reverse(args: bytes, call: Any) -> tuple[int, bytes]:
        seen.append((args, call))
        return 0, args[::-1]

    probe.services.foreign_functions["test.reverse"] = reverse
    probe.services.foreign_functions["test.empty"] = lambda args, call: (0, b"")
    ctx = stream_with(probe, [])
    name, args = put(probe, ARG, b"test.reverse"), put(probe, ARG2, b"abc")
    assert call_in(probe, ctx, "proxy_call_foreign_function", *name, *args, SLOT_PTR,
                   SLOT_SIZE) == 0
    assert returned(probe) == b"cba"
    assert seen[0][0] == b"abc" and seen[0][1].plugin_name == probe.spec.name
    empty = put(probe, ARG, b"test.empty")
    assert call_in(probe, ctx, "proxy_call_foreign_function", *empty, *args, SLOT_PTR,
                   SLOT_SIZE) == 0
    assert probe.vm.mem.read_u32(SLOT_PTR) == probe.vm.mem.read_u32(SLOT_SIZE) == 0
    unknown = put(probe, ARG, b"test.nope")
    assert call_in(probe, ctx, "proxy_call_foreign_function", *unknown, *args, SLOT_PTR,
                   SLOT_SIZE) == 1  # NOT_FOUND, as Envoy answers
    assert sum(calls.values()) == 0
    # A bad return slot: the Python method answers, before anything is called.
    name = put(probe, ARG, b"test.reverse")
    assert call_in(probe, ctx, "proxy_call_foreign_function", *name, *args, 0xFFFFFFF0,
                   SLOT_SIZE) == 6
    assert calls["proxy_call_foreign_function"] == 1


async def test_properties_are_answered_by_the_python_table_without_the_python_method(
    counted: Any,
) -> None:
    """The compiled proxy_get_property asks `properties.get_property` (Envoy's names stay
    defined there) and copies the answer out itself."""
    probe, calls = counted
    stream = probe.new_stream(StreamInfo(source_address="10.0.0.7:5555"))
    ctx = stream.ctx
    ctx.request_headers = HeaderMap([(":path", "/a?b=c")])

    def prop(path: bytes, slot: int = SLOT_PTR) -> tuple[int, bytes]:
        status = call_in(probe, ctx, "proxy_get_property", *put(probe, ARG, path), slot,
                         SLOT_SIZE)
        return status, returned(probe) if status == 0 else b""

    assert prop(b"source\0address") == (0, b"10.0.0.7:5555")
    assert prop(b"request\0query") == (0, b"b=c")
    assert prop(b"plugin_name") == (0, probe.spec.name.encode())
    assert prop(b"no\0such") == (1, b"")  # NOT_FOUND
    assert prop(b"metadata") == (0, b"")  # empty: (0, 0) written, nothing allocated
    assert probe.vm.mem.read_u32(SLOT_PTR) == probe.vm.mem.read_u32(SLOT_SIZE) == 0
    # An empty path: SERIALIZATION_FAILURE, from the table too.
    assert call_in(probe, ctx, "proxy_get_property", ARG, 0, SLOT_PTR, SLOT_SIZE) == 3
    assert sum(calls.values()) == 0
    # Bad pointers: the Python method answers, with the same status as without C.
    assert call_in(probe, ctx, "proxy_get_property", 0xFFFFFFF0, 4, SLOT_PTR, SLOT_SIZE) == 6
    assert prop(b"source\0address", slot=0xFFFFFFF0) == (6, b"")
    assert calls["proxy_get_property"] == 2


async def test_fast_paths_leak_no_python_objects(counted: Any) -> None:
    # A reference kept by mistake in C would grow Python's heap on every request.
    import tracemalloc

    probe, _ = counted
    probe.services.foreign_functions["test.reverse"] = lambda args, call: (0, args[::-1])
    key, value = put(probe, ARG, b"x-key"), put(probe, ARG2, b"value")
    name = put(probe, ARG + 64, b"test.reverse")
    prop = put(probe, ARG + 96, b"plugin_name")

    def one_round() -> None:
        ctx = stream_with(probe, [("x-key", "v"), ("a", "b")])
        for args in (("proxy_get_header_map_value", 0, *key, SLOT_PTR, SLOT_SIZE),
                     ("proxy_get_header_map_value", 0, 0xFFFFFFF0, 4, SLOT_PTR, SLOT_SIZE),
                     ("proxy_replace_header_map_value", 0, *key, *value),
                     ("proxy_add_header_map_value", 0, *key, *value),
                     ("proxy_replace_header_map_value", 0, *key, *value),
                     ("proxy_remove_header_map_value", 0, *key),
                     ("proxy_set_shared_data", *key, *value, 0),
                     ("proxy_get_shared_data", *key, SLOT_PTR, SLOT_SIZE, ARG + 128),
                     ("proxy_set_shared_data", *key, *value, 1),
                     ("proxy_call_foreign_function", *name, *value, SLOT_PTR, SLOT_SIZE),
                     ("proxy_get_property", *prop, SLOT_PTR, SLOT_SIZE),
                     ("proxy_get_current_time_nanoseconds", ARG + 128)):
            call_in(probe, ctx, *args)
        probe.streams.pop(ctx.id, None)

    for _ in range(200):
        one_round()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            one_round()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, f"Python heap grew {grown} bytes over 3,000 rounds"
