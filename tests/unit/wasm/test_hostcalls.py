"""Host functions as a plugin sees them: status codes and what lands in its memory.

Each test calls one host function from inside the WAT probe plugin (through its
``call_<name>`` forwarder) in a real root or stream context, the way a plugin would.
"""

from __future__ import annotations

import logging
import struct
import zlib

import pytest

from meshgate.gateway.wasm import HeaderMap, StreamInfo
from meshgate.gateway.wasm.abi import Status, serialize_pairs
from meshgate.gateway.wasm.host import PluginHost

from .conftest import call_in
from .wat import SLOT_CAS, SLOT_PTR, SLOT_SIZE, plugin

ARG = 512  # scratch area in the probe's memory for arguments
ARG2 = 768
BAD = 0xFFFFFFF0  # far past any linear memory

OK, NOT_FOUND, BAD_ARGUMENT = Status.OK, Status.NOT_FOUND, Status.BAD_ARGUMENT
SERIALIZATION_FAILURE, INVALID_MEMORY = Status.SERIALIZATION_FAILURE, 6


@pytest.fixture
async def probe(load) -> PluginHost:
    return await load(plugin(), configuration=b'{"k":1}', vm_configuration=b"vmconf",
                      root_id="probe_root", vm_id="probe_vm")


def put(host: PluginHost, addr: int, data: bytes) -> tuple[int, int]:
    host.vm.mem.write(addr, data)
    return addr, len(data)


def returned(host: PluginHost) -> bytes:
    """The (ptr, size) the host wrote into the return slots, as bytes."""
    mem = host.vm.mem
    ptr, size = mem.read_u32(SLOT_PTR), mem.read_u32(SLOT_SIZE)
    return mem.read(ptr, size) if size else b""


def stream_with(host: PluginHost, headers: list[tuple[str, str]], **info):
    stream = host.new_stream(StreamInfo(**info))
    stream.ctx.request_headers = HeaderMap(headers)
    return stream.ctx


# -- logging, time ------------------------------------------------------------------------
async def test_log_levels_reach_the_plugin_logger(probe, caplog):
    caplog.set_level(5, logger="meshgate.plugin.probe")
    msg = put(probe, ARG, b"hello from wasm")
    assert call_in(probe, probe.root, "proxy_log", 3, *msg) == OK
    assert ("meshgate.plugin.probe", logging.WARNING, "hello from wasm") in caplog.record_tuples


async def test_log_rejects_unknown_level_and_bad_pointer(probe):
    msg = put(probe, ARG, b"x")
    assert call_in(probe, probe.root, "proxy_log", 9, *msg) == BAD_ARGUMENT
    assert call_in(probe, probe.root, "proxy_log", 2, BAD, 4) == INVALID_MEMORY


async def test_log_level_follows_the_python_logger(probe):
    logging.getLogger("meshgate.plugin.probe").setLevel(logging.WARNING)
    try:
        assert call_in(probe, probe.root, "proxy_get_log_level", ARG) == OK
        assert probe.vm.mem.read_u32(ARG) == 3
    finally:
        logging.getLogger("meshgate.plugin.probe").setLevel(logging.NOTSET)


async def test_current_time_is_wall_clock_nanoseconds(probe):
    import time
    assert call_in(probe, probe.root, "proxy_get_current_time_nanoseconds", ARG) == OK
    (now,) = struct.unpack("<Q", probe.vm.mem.read(ARG, 8))
    assert abs(now - time.time_ns()) < 5e9
    assert call_in(probe, probe.root, "proxy_get_current_time_nanoseconds", BAD) == INVALID_MEMORY


# -- header maps --------------------------------------------------------------------------
async def test_get_header_value_present_missing_and_bad_map(probe):
    ctx = stream_with(probe, [(":path", "/a"), ("x-dup", "1"), ("X-Dup", "2")])
    key = put(probe, ARG, b"x-dup")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *key, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == b"1"  # Envoy hands out the first value
    missing = put(probe, ARG, b"x-none")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *missing, SLOT_PTR,
                   SLOT_SIZE) == NOT_FOUND
    assert call_in(probe, ctx, "proxy_get_header_map_value", 99, *key, SLOT_PTR,
                   SLOT_SIZE) == BAD_ARGUMENT
    # response headers do not exist yet during the request
    assert call_in(probe, ctx, "proxy_get_header_map_value", 2, *key, SLOT_PTR,
                   SLOT_SIZE) == NOT_FOUND


async def test_get_header_value_with_bad_pointers(probe):
    ctx = stream_with(probe, [(":path", "/a")])
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, BAD, 5, SLOT_PTR,
                   SLOT_SIZE) == INVALID_MEMORY
    key = put(probe, ARG, b":path")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *key, BAD,
                   SLOT_SIZE) == INVALID_MEMORY


async def test_huge_header_value_round_trips(probe):
    big = "v" * (1 << 20)
    ctx = stream_with(probe, [("x-big", big)])
    key = put(probe, ARG, b"x-big")
    assert call_in(probe, ctx, "proxy_get_header_map_value", 0, *key, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == big.encode()


async def test_header_pairs_serialisation_and_pseudo_headers(probe):
    headers = [(":method", "GET"), (":path", "/p"), (":authority", "h"), ("a", "1")]
    ctx = stream_with(probe, headers)
    assert call_in(probe, ctx, "proxy_get_header_map_pairs", 0, SLOT_PTR, SLOT_SIZE) == OK
    expected = serialize_pairs([(k.encode(), v.encode()) for k, v in headers])
    assert returned(probe) == expected
    assert call_in(probe, ctx, "proxy_get_header_map_size", 0, ARG) == OK
    assert probe.vm.mem.read_u32(ARG) == len(expected)


async def test_set_add_replace_remove_edit_the_stream_headers(probe):
    ctx = stream_with(probe, [(":path", "/p"), ("a", "1"), ("a", "2"), ("b", "x")])
    new = put(probe, ARG, serialize_pairs([(b":path", b"/new"), (b"c", b"3")]))
    k, v = put(probe, ARG2, b"d"), put(probe, ARG2 + 16, b"4")
    assert call_in(probe, ctx, "proxy_set_header_map_pairs", 0, *new) == OK
    assert ctx.request_headers.items() == [(":path", "/new"), ("c", "3")]
    assert call_in(probe, ctx, "proxy_add_header_map_value", 0, *k, *v) == OK
    assert call_in(probe, ctx, "proxy_add_header_map_value", 0, *k, *v) == OK
    v5 = put(probe, ARG2 + 32, b"5")
    assert call_in(probe, ctx, "proxy_replace_header_map_value", 0, *k, *v5) == OK
    assert ctx.request_headers.get_all("d") == ["5"]
    ck = put(probe, ARG2 + 48, b"c")
    assert call_in(probe, ctx, "proxy_remove_header_map_value", 0, *ck) == OK
    assert ctx.request_headers.items() == [(":path", "/new"), ("d", "5")]


async def test_truncated_pairs_are_a_serialisation_failure(probe):
    ctx = stream_with(probe, [("a", "1")])
    bad = put(probe, ARG, struct.pack("<III", 5, 1, 1))
    assert call_in(probe, ctx, "proxy_set_header_map_pairs", 0, *bad) == SERIALIZATION_FAILURE
    assert ctx.request_headers.items() == [("a", "1")]


async def test_empty_map_is_handed_out_as_null(probe):
    ctx = stream_with(probe, [])
    assert call_in(probe, ctx, "proxy_get_header_map_pairs", 0, SLOT_PTR, SLOT_SIZE) == OK
    assert (probe.vm.mem.read_u32(SLOT_PTR), probe.vm.mem.read_u32(SLOT_SIZE)) == (0, 0)


# -- buffers ------------------------------------------------------------------------------
async def test_configuration_buffers(probe):
    ctx = stream_with(probe, [])
    assert call_in(probe, ctx, "proxy_get_buffer_bytes", 6, 0, 100, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == b"vmconf"
    # Envoy answers NOT_FOUND for the plugin configuration outside on_configure.
    assert call_in(probe, ctx, "proxy_get_buffer_bytes", 7, 0, 100, SLOT_PTR,
                   SLOT_SIZE) == NOT_FOUND
    assert call_in(probe, ctx, "proxy_get_buffer_bytes", 99, 0, 1, SLOT_PTR,
                   SLOT_SIZE) == BAD_ARGUMENT


async def test_plugin_configuration_is_readable_in_on_configure(load):
    wat = plugin(on_configure="""
        (drop (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $size)
               (i32.const 0) (i32.const 4)))
        (drop (call $proxy_log (i32.const 2) (i32.load (i32.const 0)) (i32.load (i32.const 4))))
        (i32.const 1)""")
    import logging as _l
    records: list[str] = []

    class H(_l.Handler):
        def emit(self, record: _l.LogRecord) -> None:
            records.append(record.getMessage())

    logger = _l.getLogger("meshgate.plugin.cfg")
    handler = H()
    logger.addHandler(handler)
    logger.setLevel(_l.DEBUG)
    try:
        await load(wat, name="cfg", configuration=b'{"limit": 5}')
    finally:
        logger.removeHandler(handler)
    assert records == ['{"limit": 5}']


async def test_request_body_during_headers_is_empty_ok(probe):
    ctx = stream_with(probe, [(":method", "GET")])
    assert call_in(probe, ctx, "proxy_get_buffer_bytes", 0, 0, 1000, SLOT_PTR, SLOT_SIZE) == OK
    assert (probe.vm.mem.read_u32(SLOT_PTR), probe.vm.mem.read_u32(SLOT_SIZE)) == (0, 0)


async def test_body_edits_follow_envoys_rules(probe):
    ctx = stream_with(probe, [])
    body = bytearray(b"hello world")
    from meshgate.gateway.wasm.context import Buffer
    ctx.request_body = Buffer(body, mutable=True)
    assert call_in(probe, ctx, "proxy_get_buffer_bytes", 0, 6, 100, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == b"world"
    repl = put(probe, ARG, b"HELLO")
    assert call_in(probe, ctx, "proxy_set_buffer_bytes", 0, 0, 5, *repl) == OK
    assert body == b"HELLO world"
    tail = put(probe, ARG, b"!")
    assert call_in(probe, ctx, "proxy_set_buffer_bytes", 0, 11, 0, *tail) == OK
    assert body == b"HELLO world!"
    assert call_in(probe, ctx, "proxy_set_buffer_bytes", 0, 3, 1, *tail) == BAD_ARGUMENT
    assert call_in(probe, ctx, "proxy_get_buffer_status", 0, ARG, ARG + 4) == OK
    assert probe.vm.mem.read_u32(ARG) == 12


# -- shared data --------------------------------------------------------------------------
async def test_shared_data_cas_semantics(probe):
    key, val = put(probe, ARG, b"k"), put(probe, ARG2, b"v1")
    root = probe.root
    assert call_in(probe, root, "proxy_get_shared_data", *key, SLOT_PTR, SLOT_SIZE,
                   SLOT_CAS) == NOT_FOUND
    assert call_in(probe, root, "proxy_set_shared_data", *key, *val, 0) == OK
    assert call_in(probe, root, "proxy_get_shared_data", *key, SLOT_PTR, SLOT_SIZE,
                   SLOT_CAS) == OK
    cas = probe.vm.mem.read_u32(SLOT_CAS)
    assert (returned(probe), cas) == (b"v1", 1)
    val2 = put(probe, ARG2, b"v2")
    mismatch = call_in(probe, root, "proxy_set_shared_data", *key, *val2, cas + 7)
    assert mismatch == Status.CAS_MISMATCH
    assert call_in(probe, root, "proxy_set_shared_data", *key, *val2, cas) == OK
    call_in(probe, root, "proxy_get_shared_data", *key, SLOT_PTR, SLOT_SIZE, SLOT_CAS)
    assert (returned(probe), probe.vm.mem.read_u32(SLOT_CAS)) == (b"v2", 2)


async def test_shared_data_is_shared_by_vm_id_only(load, probe):
    other = await load(plugin(), name="other", vm_id="other_vm")
    key, val = put(probe, ARG, b"k"), put(probe, ARG2, b"v")
    assert call_in(probe, probe.root, "proxy_set_shared_data", *key, *val, 0) == OK
    key2 = put(other, ARG, b"k")
    assert call_in(other, other.root, "proxy_get_shared_data", *key2, SLOT_PTR, SLOT_SIZE,
                   SLOT_CAS) == NOT_FOUND


# -- shared queues ------------------------------------------------------------------------
async def test_queue_not_found_empty_and_round_trip(probe):
    root = probe.root
    name, vm = put(probe, ARG, b"q"), put(probe, ARG2, b"probe_vm")
    assert call_in(probe, root, "proxy_resolve_shared_queue", *vm, *name, ARG + 64) == NOT_FOUND
    assert call_in(probe, root, "proxy_dequeue_shared_queue", 12345, SLOT_PTR,
                   SLOT_SIZE) == NOT_FOUND
    assert call_in(probe, root, "proxy_enqueue_shared_queue", 12345, *name) == NOT_FOUND
    assert call_in(probe, root, "proxy_register_shared_queue", *name, ARG + 64) == OK
    qid = probe.vm.mem.read_u32(ARG + 64)
    assert call_in(probe, root, "proxy_resolve_shared_queue", *vm, *name, ARG + 68) == OK
    assert probe.vm.mem.read_u32(ARG + 68) == qid
    assert call_in(probe, root, "proxy_dequeue_shared_queue", qid, SLOT_PTR,
                   SLOT_SIZE) == Status.EMPTY
    item = put(probe, ARG2, b"item-1")
    assert call_in(probe, root, "proxy_enqueue_shared_queue", qid, *item) == OK
    assert call_in(probe, root, "proxy_dequeue_shared_queue", qid, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == b"item-1"


async def test_enqueue_wakes_the_registering_plugin(load):
    import asyncio
    wat = plugin(strings={"q": b"jobs", "ready": b"queue ready"},
                 on_configure="""(drop (call $proxy_register_shared_queue @q #q (i32.const 64)))
                                  (i32.const 1)""",
                 on_queue_ready="(drop (call $proxy_log (i32.const 4) @ready #ready))")
    host = await load(wat, vm_id="qvm")
    qid = host.services.shared_queues.resolve("qvm", b"jobs")
    assert qid is not None
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("meshgate.plugin.probe").addHandler(handler)
    try:
        assert host.services.shared_queues.enqueue(qid, b"x") == OK
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        logging.getLogger("meshgate.plugin.probe").removeHandler(handler)
    assert seen == ["queue ready"]


# -- metrics ------------------------------------------------------------------------------
async def test_metrics_counter_gauge_histogram(probe):
    root, mem = probe.root, probe.vm.mem
    name = put(probe, ARG, b"requests.allowed")
    assert call_in(probe, root, "proxy_define_metric", 0, *name, ARG + 64) == OK
    counter = mem.read_u32(ARG + 64)
    assert call_in(probe, root, "proxy_increment_metric", counter, 3) == OK
    assert call_in(probe, root, "proxy_increment_metric", counter, -1) == BAD_ARGUMENT
    assert call_in(probe, root, "proxy_get_metric", counter, ARG + 72) == OK
    assert struct.unpack("<Q", mem.read(ARG + 72, 8))[0] == 3
    registry = probe.services.metrics_registry
    assert registry.get_sample_value("wasmcustom_requests_allowed_total") == 3

    gname = put(probe, ARG, b"inflight")
    assert call_in(probe, root, "proxy_define_metric", 1, *gname, ARG + 64) == OK
    gauge = mem.read_u32(ARG + 64)
    assert call_in(probe, root, "proxy_record_metric", gauge, 7) == OK
    assert call_in(probe, root, "proxy_increment_metric", gauge, -2) == OK
    assert registry.get_sample_value("wasmcustom_inflight") == 5

    hname = put(probe, ARG, b"latency")
    assert call_in(probe, root, "proxy_define_metric", 2, *hname, ARG + 64) == OK
    hist = mem.read_u32(ARG + 64)
    assert call_in(probe, root, "proxy_record_metric", hist, 12) == OK
    assert call_in(probe, root, "proxy_get_metric", hist, ARG + 72) == BAD_ARGUMENT
    assert registry.get_sample_value("wasmcustom_latency_count") == 1


async def test_unknown_metric_and_type(probe):
    root = probe.root
    assert call_in(probe, root, "proxy_get_metric", 999, ARG) == BAD_ARGUMENT
    assert call_in(probe, root, "proxy_increment_metric", 999, 1) == NOT_FOUND
    name = put(probe, ARG, b"m")
    assert call_in(probe, root, "proxy_define_metric", 7, *name, ARG + 64) == BAD_ARGUMENT


# -- properties ---------------------------------------------------------------------------
async def test_properties_with_envoy_names_and_encodings(probe):
    ctx = stream_with(probe, [(":path", "/probe/props?a=b"), (":method", "GET"),
                              (":authority", "h:1"), ("user-agent", "ua")],
                      source_address="127.0.0.1:41644", destination_address="127.0.0.1:27000")

    def prop(path: bytes) -> tuple[int, bytes]:
        p = put(probe, ARG, path)
        status = call_in(probe, ctx, "proxy_get_property", *p, SLOT_PTR, SLOT_SIZE)
        return status, returned(probe) if status == OK else b""

    assert prop(b"request\0path") == (OK, b"/probe/props?a=b")
    assert prop(b"request\0url_path") == (OK, b"/probe/props")
    assert prop(b"request\0query") == (OK, b"a=b")
    assert prop(b"request\0headers\0user-agent") == (OK, b"ua")
    assert prop(b"source\0address") == (OK, b"127.0.0.1:41644")
    assert prop(b"source\0port") == (OK, bytes.fromhex("aca2000000000000"))
    assert prop(b"plugin_name") == (OK, b"probe")
    assert prop(b"plugin_root_id") == (OK, b"probe_root")
    assert prop(b"plugin_vm_id") == (OK, b"probe_vm")
    assert prop(b"response\0code") == (NOT_FOUND, b"")
    assert prop(b"node\0id") == (NOT_FOUND, b"")
    assert prop(b"no\0such") == (NOT_FOUND, b"")
    assert prop(b"filter_state") == (SERIALIZATION_FAILURE, b"")
    empty = call_in(probe, ctx, "proxy_get_property", ARG, 0, SLOT_PTR, SLOT_SIZE)
    assert empty == SERIALIZATION_FAILURE


async def test_set_property_is_visible_to_later_gets(probe):
    ctx = stream_with(probe, [])
    path, val = put(probe, ARG, b"my\0prop"), put(probe, ARG2, b"42")
    assert call_in(probe, ctx, "proxy_set_property", *path, *val) == OK
    assert call_in(probe, ctx, "proxy_get_property", *path, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == b"42"


async def test_a_set_property_is_seen_by_the_streams_other_plugins_only(probe):
    """Envoy's filter state: one per stream, shared by its filters."""
    info = StreamInfo()
    setter, reader = probe.new_stream(info).ctx, probe.new_stream(info).ctx
    other_request = stream_with(probe, [])
    path, val = put(probe, ARG, b"my\0prop"), put(probe, ARG2, b"7")
    assert call_in(probe, setter, "proxy_set_property", *path, *val) == OK
    assert call_in(probe, reader, "proxy_get_property", *path, SLOT_PTR, SLOT_SIZE) == OK
    assert returned(probe) == b"7"
    found = call_in(probe, other_request, "proxy_get_property", *path, SLOT_PTR, SLOT_SIZE)
    assert found == NOT_FOUND


# -- foreign functions, http_call validation ----------------------------------------------
async def test_foreign_functions(probe):
    ctx = stream_with(probe, [])
    name, args = put(probe, ARG, b"no_such_function"), put(probe, ARG2, b"data" * 10)
    assert call_in(probe, ctx, "proxy_call_foreign_function", *name, *args, SLOT_PTR,
                   SLOT_SIZE) == NOT_FOUND
    name = put(probe, ARG, b"compress")
    assert call_in(probe, ctx, "proxy_call_foreign_function", *name, *args, SLOT_PTR,
                   SLOT_SIZE) == OK
    assert zlib.decompress(returned(probe)) == b"data" * 10


async def test_http_call_to_unknown_cluster_or_without_path(probe):
    class Dispatcher:
        def has_cluster(self, name: str) -> bool:
            return name == "known"

        async def __call__(self, *a):  # pragma: no cover - never reached
            raise AssertionError

    probe.services.http_dispatcher = Dispatcher()
    ctx = stream_with(probe, [])
    hdrs = put(probe, ARG, serialize_pairs([(b":method", b"GET"), (b":path", b"/"),
                                            (b":authority", b"x")]))
    unknown = put(probe, ARG2, b"nope")
    assert call_in(probe, ctx, "proxy_http_call", *unknown, *hdrs, 0, 0, 0, 0, 1000,
                   ARG + 400) == BAD_ARGUMENT
    no_path = put(probe, ARG, serialize_pairs([(b":method", b"GET"), (b":authority", b"x")]))
    known = put(probe, ARG2, b"known")
    assert call_in(probe, ctx, "proxy_http_call", *known, *no_path, 0, 0, 0, 0, 1000,
                   ARG + 400) == BAD_ARGUMENT


async def test_grpc_calls_answer_without_crashing(probe):
    ctx = stream_with(probe, [])
    name = put(probe, ARG, b"nope")
    assert call_in(probe, ctx, "proxy_grpc_call", *name, 0, 0, 0, 0, 0, 0, 0, 0, 1000,
                   ARG + 64) == BAD_ARGUMENT
    assert call_in(probe, ctx, "proxy_grpc_cancel", 4) == BAD_ARGUMENT


async def test_set_effective_context_to_unknown_id(probe):
    assert call_in(probe, probe.root, "proxy_set_effective_context", 999) == BAD_ARGUMENT


# -- WASI ---------------------------------------------------------------------------------
async def test_fd_write_logs_stdout_and_stderr(probe, caplog):
    caplog.set_level(logging.INFO, logger="meshgate.plugin.probe")
    text = put(probe, ARG2, b"printed line\n")
    probe.vm.mem.write(ARG, struct.pack("<II", *text))
    assert call_in(probe, probe.root, "wasi_fd_write", 2, ARG, 1, ARG + 16) == 0
    assert probe.vm.mem.read_u32(ARG + 16) == 13
    assert ("meshgate.plugin.probe", logging.ERROR, "printed line") in caplog.record_tuples
    assert call_in(probe, probe.root, "wasi_fd_write", 3, ARG, 1, ARG + 16) == 8  # BADF
    assert call_in(probe, probe.root, "wasi_fd_write", 1, BAD, 1, ARG + 16) == 21  # FAULT


async def test_wasi_clock_random_environ(load):
    host = await load(plugin(), environment=(("MODE", "test"),))
    root = host.root
    assert call_in(host, root, "wasi_clock_time_get", 1, 0, ARG) == 0
    assert call_in(host, root, "wasi_clock_time_get", 7, 0, ARG) == 58  # NOTSUP
    assert call_in(host, root, "wasi_random_get", ARG, 32) == 0
    assert call_in(host, root, "wasi_environ_sizes_get", ARG, ARG + 4) == 0
    assert (host.vm.mem.read_u32(ARG), host.vm.mem.read_u32(ARG + 4)) == (1, 10)
    assert call_in(host, root, "wasi_environ_get", ARG, ARG2) == 0
    assert host.vm.mem.read(host.vm.mem.read_u32(ARG), 10) == b"MODE=test\0"
    assert call_in(host, root, "wasi_args_sizes_get", ARG, ARG + 4) == 0
    assert call_in(host, root, "wasi_fd_prestat_get", 3, ARG) == 8  # no preopens
    assert call_in(host, root, "wasi_fd_read", 0, ARG, 1, ARG + 8) == 52
