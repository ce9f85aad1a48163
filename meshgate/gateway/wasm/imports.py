"""The proxy-wasm import table (module ``env``): pointer/length marshalling and status codes.

Each method is one ABI row of /work/shared/reference/proxy-wasm-abi.md: it reads its
arguments out of guest memory, asks the behaviour layer (``ImportTarget``, implemented by
the plugin host) or a context, writes results back and answers a ``proxy_status_t``.
Bad pointers raise ``GuestMemoryError`` out of ``GuestMemory``; the trampoline in
``_rawcall`` turns that into INVALID_MEMORY_ACCESS, so no method checks it by hand.
"""

from __future__ import annotations

import time
from typing import Protocol

from ._rawcall import HostFunctionTable
from .abi import (
    BufferType,
    LogLevel,
    MapType,
    PairsFormatError,
    Status,
    StreamType,
    deserialize_pairs,
    serialize_pairs,
)
from .context import Context, LocalReplyRequest
from .headers import HeaderMap
from .properties import PluginIdentity, get_property, set_property
from .services import HostServices
from .vm import PluginVM

OK, NOT_FOUND, BAD_ARGUMENT = int(Status.OK), int(Status.NOT_FOUND), int(Status.BAD_ARGUMENT)
_LAST_MAP = int(MapType.HTTP_CALL_RESPONSE_TRAILERS)
_LAST_BUFFER = int(BufferType.FOREIGN_FUNCTION_ARGUMENTS)


class ImportTarget(Protocol):
    """What the import table needs from the plugin host (the behaviour layer)."""

    vm: PluginVM
    services: HostServices
    identity: PluginIdentity
    log_level: LogLevel

    @property
    def effective(self) -> Context: ...

    def set_effective_context(self, context_id: int) -> Status: ...
    def log(self, level: int, message: str) -> None: ...
    def set_tick_period(self, period_ms: int) -> None: ...
    def continue_stream(self, stream: StreamType) -> Status: ...
    def close_stream(self, stream: StreamType) -> Status: ...
    def send_local_response(self, reply: LocalReplyRequest) -> Status: ...
    def http_call(self, cluster: str, headers: list[tuple[str, str]], body: bytes,
                  trailers: list[tuple[str, str]], timeout_ms: int) -> tuple[Status, int]: ...
    def register_queue(self, name: bytes) -> int: ...
    def call_foreign(self, name: str, args: bytes) -> tuple[Status, bytes]: ...
    def done(self) -> Status: ...


def _pairs_to_str(pairs: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("utf-8", "replace"), v.decode("utf-8", "replace")) for k, v in pairs]


class ProxyWasmImports:
    """The ``env`` host functions, bound to one plugin host."""

    __slots__ = ("t",)

    def __init__(self, target: ImportTarget) -> None:
        self.t = target

    # -- helpers ------------------------------------------------------------------------
    def _str(self, ptr: int, size: int) -> str:
        return self.t.vm.mem.read_str(ptr, size)

    def _map(self, map_type: int) -> tuple[int, HeaderMap | None]:
        """(status, map): BAD_ARGUMENT past the last map type, NOT_FOUND if unavailable."""
        if map_type > _LAST_MAP:
            return BAD_ARGUMENT, None
        m = self.t.effective.header_map(map_type)
        return (OK, m) if m is not None else (NOT_FOUND, None)

    # -- logging, time, context -----------------------------------------------------------
    def proxy_log(self, level: int, msg_ptr: int, msg_size: int) -> int:
        if level > LogLevel.CRITICAL:
            return BAD_ARGUMENT
        self.t.log(level, self._str(msg_ptr, msg_size))
        return OK

    def proxy_get_log_level(self, ret_level: int) -> int:
        self.t.vm.mem.write_u32(ret_level, int(self.t.log_level))
        return OK

    def proxy_get_current_time_nanoseconds(self, ret_time: int) -> int:
        self.t.vm.mem.write_u64(ret_time, time.time_ns())
        return OK

    def proxy_set_effective_context(self, context_id: int) -> int:
        return int(self.t.set_effective_context(context_id))

    def proxy_done(self) -> int:
        return int(self.t.done())

    def proxy_set_tick_period_milliseconds(self, period_ms: int) -> int:
        self.t.set_tick_period(period_ms)
        return OK

    # -- buffers ----------------------------------------------------------------------
    def proxy_get_buffer_bytes(self, btype: int, start: int, max_size: int, ret_ptr: int,
                               ret_size: int) -> int:
        if btype > _LAST_BUFFER:
            return BAD_ARGUMENT
        buf = self.t.effective.buffer(btype)
        if buf is None:
            return NOT_FOUND
        self.t.vm.copy_out(buf.slice(start, max_size), ret_ptr, ret_size)
        return OK

    def proxy_get_buffer_status(self, btype: int, ret_size: int, ret_flags: int) -> int:
        if btype > _LAST_BUFFER:
            return BAD_ARGUMENT
        buf = self.t.effective.buffer(btype)
        if buf is None:
            return NOT_FOUND
        self.t.vm.mem.write_u32(ret_size, len(buf.data))
        self.t.vm.mem.write_u32(ret_flags, 0)
        return OK

    def proxy_set_buffer_bytes(self, btype: int, start: int, size: int, value_ptr: int,
                               value_size: int) -> int:
        if btype > _LAST_BUFFER:
            return BAD_ARGUMENT
        buf = self.t.effective.buffer(btype)
        if buf is None:
            return NOT_FOUND
        return int(buf.copy_from(start, size, self.t.vm.mem.read(value_ptr, value_size)))

    # -- header maps ------------------------------------------------------------------
    def proxy_get_header_map_size(self, map_type: int, ret_size: int) -> int:
        status, m = self._map(map_type)
        if m is None:
            return status
        size = len(serialize_pairs([(k.encode(), v.encode()) for k, v in m])) if len(m) else 0
        self.t.vm.mem.write_u32(ret_size, size)
        return OK

    def proxy_get_header_map_pairs(self, map_type: int, ret_ptr: int, ret_size: int) -> int:
        status, m = self._map(map_type)
        if m is None:
            return status
        # cpp-host hands out an empty map as (0, 0), not as a 4-byte zero count.
        data = serialize_pairs([(k.encode(), v.encode()) for k, v in m]) if len(m) else b""
        self.t.vm.copy_out(data, ret_ptr, ret_size)
        return OK

    def proxy_set_header_map_pairs(self, map_type: int, ptr: int, size: int) -> int:
        status, m = self._map(map_type)
        if m is None:
            return status
        try:
            pairs = deserialize_pairs(self.t.vm.mem.read(ptr, size))
        except PairsFormatError:
            return int(Status.SERIALIZATION_FAILURE)
        m.replace_all(_pairs_to_str(pairs))
        return OK

    def proxy_get_header_map_value(self, map_type: int, key_ptr: int, key_size: int,
                                   ret_ptr: int, ret_size: int) -> int:
        # The most frequent read a plugin makes: _map and _str inlined (each layer is
        # a Python call on a path that runs several times a request).
        if map_type > _LAST_MAP:
            return BAD_ARGUMENT
        t = self.t
        m = t.effective.header_map(map_type)
        if m is None:
            return NOT_FOUND
        vm = t.vm
        # Envoy returns the first value of a repeated header (not a joined list).
        value = m.get(vm.mem.read_str(key_ptr, key_size))
        if value is None:
            return NOT_FOUND
        vm.copy_out(value.encode(), ret_ptr, ret_size)
        return OK

    def proxy_add_header_map_value(self, map_type: int, key_ptr: int, key_size: int,
                                   value_ptr: int, value_size: int) -> int:
        status, m = self._map(map_type)
        if m is None:
            return status
        m.add(self._str(key_ptr, key_size), self._str(value_ptr, value_size))
        return OK

    def proxy_replace_header_map_value(self, map_type: int, key_ptr: int, key_size: int,
                                       value_ptr: int, value_size: int) -> int:
        if map_type > _LAST_MAP:
            return BAD_ARGUMENT
        t = self.t
        m = t.effective.header_map(map_type)
        if m is None:
            return NOT_FOUND
        mem = t.vm.mem
        m.set(mem.read_str(key_ptr, key_size), mem.read_str(value_ptr, value_size))
        return OK

    def proxy_remove_header_map_value(self, map_type: int, key_ptr: int, key_size: int) -> int:
        status, m = self._map(map_type)
        if m is None:
            return status
        m.remove(self._str(key_ptr, key_size))
        return OK

    # -- stream control ---------------------------------------------------------------
    def proxy_continue_stream(self, stream_type: int) -> int:
        if stream_type > StreamType.UPSTREAM:
            return BAD_ARGUMENT
        return int(self.t.continue_stream(StreamType(stream_type)))

    def proxy_close_stream(self, stream_type: int) -> int:
        if stream_type > StreamType.UPSTREAM:
            return BAD_ARGUMENT
        return int(self.t.close_stream(StreamType(stream_type)))

    def proxy_continue_request(self) -> int:  # ABI 0.1.0
        return int(self.t.continue_stream(StreamType.HTTP_REQUEST))

    def proxy_continue_response(self) -> int:  # ABI 0.1.0
        return int(self.t.continue_stream(StreamType.HTTP_RESPONSE))

    def proxy_send_local_response(self, status_code: int, details_ptr: int, details_size: int,
                                  body_ptr: int, body_size: int, headers_ptr: int,
                                  headers_size: int, grpc_status: int) -> int:
        mem = self.t.vm.mem
        try:
            headers = deserialize_pairs(mem.read(headers_ptr, headers_size))
        except PairsFormatError:
            return int(Status.SERIALIZATION_FAILURE)
        reply = LocalReplyRequest(
            status=status_code,
            details=self._str(details_ptr, details_size),
            body=mem.read(body_ptr, body_size),
            headers=_pairs_to_str(headers),
            grpc_status=grpc_status,
        )
        return int(self.t.send_local_response(reply))

    def proxy_get_status(self, ret_code: int, ret_msg_ptr: int, ret_msg_size: int) -> int:
        ctx = self.t.effective
        response = getattr(ctx, "call_response", None)
        if response is None:
            return NOT_FOUND
        status = response.headers.get(":status")
        self.t.vm.mem.write_u32(ret_code, int(status) if status and status.isdigit() else 0)
        self.t.vm.copy_out(b"", ret_msg_ptr, ret_msg_size)
        return OK

    # -- http calls -------------------------------------------------------------------
    def proxy_http_call(self, up_ptr: int, up_size: int, hdr_ptr: int, hdr_size: int,
                        body_ptr: int, body_size: int, trl_ptr: int, trl_size: int,
                        timeout_ms: int, ret_token: int) -> int:
        mem = self.t.vm.mem
        mem.write_u32(ret_token, 0)  # validate the slot before doing anything
        try:
            headers = _pairs_to_str(deserialize_pairs(mem.read(hdr_ptr, hdr_size)))
            trailers = _pairs_to_str(deserialize_pairs(mem.read(trl_ptr, trl_size)))
        except PairsFormatError:
            return int(Status.SERIALIZATION_FAILURE)
        status, token = self.t.http_call(self._str(up_ptr, up_size), headers,
                                         mem.read(body_ptr, body_size), trailers, timeout_ms)
        if status == Status.OK:
            mem.write_u32(ret_token, token)
        return int(status)

    def proxy_grpc_call(self, up_ptr: int, up_size: int, *_rest: int) -> int:
        return self._grpc(up_ptr, up_size)

    def proxy_grpc_stream(self, up_ptr: int, up_size: int, *_rest: int) -> int:
        return self._grpc(up_ptr, up_size)

    def _grpc(self, up_ptr: int, up_size: int) -> int:
        # gRPC callouts are not implemented: an unknown cluster answers as in Envoy,
        # a known one says so explicitly instead of pretending to send.
        if not self.t.services.has_cluster(self._str(up_ptr, up_size)):
            return BAD_ARGUMENT
        return int(Status.UNIMPLEMENTED)

    def proxy_grpc_send(self, _token: int, _p: int, _s: int, _end: int) -> int:
        return BAD_ARGUMENT

    def proxy_grpc_cancel(self, _token: int) -> int:
        return BAD_ARGUMENT

    def proxy_grpc_close(self, _token: int) -> int:
        return BAD_ARGUMENT

    # -- shared data and queues -------------------------------------------------------
    def proxy_get_shared_data(self, key_ptr: int, key_size: int, ret_ptr: int, ret_size: int,
                              ret_cas: int) -> int:
        found = self.t.services.shared_data.get(self.t.identity.vm_id,
                                                self.t.vm.mem.read(key_ptr, key_size))
        if found is None:
            return NOT_FOUND
        value, cas = found
        self.t.vm.mem.write_u32(ret_cas, cas)
        self.t.vm.copy_out(value, ret_ptr, ret_size)
        return OK

    def proxy_set_shared_data(self, key_ptr: int, key_size: int, value_ptr: int,
                              value_size: int, cas: int) -> int:
        mem = self.t.vm.mem
        return int(self.t.services.shared_data.set(
            self.t.identity.vm_id, mem.read(key_ptr, key_size), mem.read(value_ptr, value_size),
            cas))

    def proxy_register_shared_queue(self, name_ptr: int, name_size: int, ret_id: int) -> int:
        self.t.vm.mem.write_u32(ret_id, self.t.register_queue(
            self.t.vm.mem.read(name_ptr, name_size)))
        return OK

    def proxy_resolve_shared_queue(self, vm_ptr: int, vm_size: int, name_ptr: int,
                                   name_size: int, ret_id: int) -> int:
        mem = self.t.vm.mem
        qid = self.t.services.shared_queues.resolve(self._str(vm_ptr, vm_size),
                                                    mem.read(name_ptr, name_size))
        if qid is None:
            return NOT_FOUND
        mem.write_u32(ret_id, qid)
        return OK

    def proxy_enqueue_shared_queue(self, qid: int, value_ptr: int, value_size: int) -> int:
        return int(self.t.services.shared_queues.enqueue(
            qid, self.t.vm.mem.read(value_ptr, value_size)))

    def proxy_dequeue_shared_queue(self, qid: int, ret_ptr: int, ret_size: int) -> int:
        status, value = self.t.services.shared_queues.dequeue(qid)
        if status == Status.OK:
            self.t.vm.copy_out(value, ret_ptr, ret_size)
        return int(status)

    # -- metrics ----------------------------------------------------------------------
    def proxy_define_metric(self, mtype: int, name_ptr: int, name_size: int,
                            ret_id: int) -> int:
        status, mid = self.t.services.metrics.define(mtype, self._str(name_ptr, name_size))
        if status == Status.OK:
            self.t.vm.mem.write_u32(ret_id, mid)
        return int(status)

    def proxy_increment_metric(self, mid: int, delta: int) -> int:
        return self.t.services.metrics.increment(mid, delta)  # an IntEnum: packs as an int

    def proxy_record_metric(self, mid: int, value: int) -> int:
        return int(self.t.services.metrics.record(mid, value & 0xFFFFFFFFFFFFFFFF))

    def proxy_get_metric(self, mid: int, ret_value: int) -> int:
        status, value = self.t.services.metrics.get(mid)
        if status == Status.OK:
            self.t.vm.mem.write_u64(ret_value, value)
        return int(status)

    # -- properties and foreign functions ---------------------------------------------
    def proxy_get_property(self, path_ptr: int, path_size: int, ret_ptr: int,
                           ret_size: int) -> int:
        status, value = get_property(self.t.effective, self.t.identity,
                                     self.t.vm.mem.read(path_ptr, path_size))
        if status == Status.OK:
            self.t.vm.copy_out(value, ret_ptr, ret_size)
        return int(status)

    def proxy_set_property(self, path_ptr: int, path_size: int, value_ptr: int,
                           value_size: int) -> int:
        mem = self.t.vm.mem
        return int(set_property(self.t.effective, mem.read(path_ptr, path_size),
                                mem.read(value_ptr, value_size)))

    def proxy_call_foreign_function(self, name_ptr: int, name_size: int, args_ptr: int,
                                    args_size: int, ret_ptr: int, ret_size: int) -> int:
        mem = self.t.vm.mem
        status, result = self.t.call_foreign(self._str(name_ptr, name_size),
                                             mem.read(args_ptr, args_size))
        if status == Status.OK:
            self.t.vm.copy_out(result, ret_ptr, ret_size)
        return int(status)

    # -- ABI 0.1.0 leftovers and emscripten compatibility ---------------------------------
    def proxy_get_configuration(self, ret_ptr: int, ret_size: int) -> int:
        buf = self.t.effective.buffer(BufferType.PLUGIN_CONFIGURATION)
        if buf is None:
            return NOT_FOUND
        self.t.vm.copy_out(bytes(buf.data), ret_ptr, ret_size)
        return OK

    def proxy_clear_route_cache(self) -> int:
        return OK

    def emscripten_notify_memory_growth(self, _index: int) -> None:
        return None

    def pthread_equal(self, a: int, b: int) -> int:
        return 1 if a == b else 0


# (name, params, results): every ``env`` import Envoy links, in ABI-table order.
ENV_SIGNATURES: list[tuple[str, str, str]] = [
    ("proxy_log", "iii", "i"),
    ("proxy_get_log_level", "i", "i"),
    ("proxy_get_current_time_nanoseconds", "i", "i"),
    ("proxy_set_effective_context", "i", "i"),
    ("proxy_done", "", "i"),
    ("proxy_set_tick_period_milliseconds", "i", "i"),
    ("proxy_get_buffer_bytes", "iiiii", "i"),
    ("proxy_get_buffer_status", "iii", "i"),
    ("proxy_set_buffer_bytes", "iiiii", "i"),
    ("proxy_get_header_map_size", "ii", "i"),
    ("proxy_get_header_map_pairs", "iii", "i"),
    ("proxy_set_header_map_pairs", "iii", "i"),
    ("proxy_get_header_map_value", "iiiii", "i"),
    ("proxy_add_header_map_value", "iiiii", "i"),
    ("proxy_replace_header_map_value", "iiiii", "i"),
    ("proxy_remove_header_map_value", "iii", "i"),
    ("proxy_continue_stream", "i", "i"),
    ("proxy_close_stream", "i", "i"),
    ("proxy_continue_request", "", "i"),
    ("proxy_continue_response", "", "i"),
    ("proxy_send_local_response", "iiiiiiii", "i"),
    ("proxy_get_status", "iii", "i"),
    ("proxy_http_call", "iiiiiiiiii", "i"),
    ("proxy_grpc_call", "iiiiiiiiiiii", "i"),
    ("proxy_grpc_stream", "iiiiiiiii", "i"),
    ("proxy_grpc_send", "iiii", "i"),
    ("proxy_grpc_cancel", "i", "i"),
    ("proxy_grpc_close", "i", "i"),
    ("proxy_get_shared_data", "iiiii", "i"),
    ("proxy_set_shared_data", "iiiii", "i"),
    ("proxy_register_shared_queue", "iii", "i"),
    ("proxy_resolve_shared_queue", "iiiii", "i"),
    ("proxy_enqueue_shared_queue", "iii", "i"),
    ("proxy_dequeue_shared_queue", "iii", "i"),
    ("proxy_define_metric", "iiii", "i"),
    ("proxy_increment_metric", "iI", "i"),
    ("proxy_record_metric", "iI", "i"),
    ("proxy_get_metric", "ii", "i"),
    ("proxy_get_property", "iiii", "i"),
    ("proxy_set_property", "iiii", "i"),
    ("proxy_call_foreign_function", "iiiiii", "i"),
    ("proxy_get_configuration", "ii", "i"),
    ("proxy_clear_route_cache", "", "i"),
    ("emscripten_notify_memory_growth", "i", ""),
    ("pthread_equal", "ii", "i"),
]


def define_env(table: HostFunctionTable, imports: ProxyWasmImports) -> None:
    for name, params, results in ENV_SIGNATURES:
        table.define("env", name, params, results, getattr(imports, name),
                     on_bad_memory=int(Status.INVALID_MEMORY_ACCESS), state=imports)
