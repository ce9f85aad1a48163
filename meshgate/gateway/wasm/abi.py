"""Proxy-wasm ABI v0.2.1 constants and the map serialisation format.

Values follow the spec's enums (see /work/shared/reference/proxy-wasm-abi.md §2, §3).
"""

from __future__ import annotations

import struct
from enum import IntEnum


class Status(IntEnum):
    """``proxy_status_t`` (WasmResult)."""

    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    UNIMPLEMENTED = 12


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class Action(IntEnum):
    CONTINUE = 0
    PAUSE = 1


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_CALL_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8


class MapType(IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_CALL_INITIAL_METADATA = 4
    GRPC_CALL_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class WasiErrno(IntEnum):
    SUCCESS = 0
    BADF = 8
    FAULT = 21
    INVAL = 28
    NOENT = 44
    NOSYS = 52
    NOTSUP = 58
    NOTCAPABLE = 76


ABI_MARKERS = ("proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0")


class PairsFormatError(ValueError):
    """Serialised header pairs from the plugin are truncated or inconsistent."""


def serialize_pairs(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Encode pairs: u32 count, (u32 key_len, u32 value_len)*, then key\\0value\\0 each."""
    sizes = bytearray(struct.pack("<I", len(pairs)))
    data = bytearray()
    for k, v in pairs:
        sizes += struct.pack("<II", len(k), len(v))
        data += k + b"\0" + v + b"\0"
    return bytes(sizes + data)


def deserialize_pairs(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Decode the pairs format; empty input, a lone NUL or a zero count mean no pairs."""
    if len(raw) < 4:
        if raw in (b"", b"\0"):
            return []
        raise PairsFormatError(f"{len(raw)} bytes is too short for a pair count")
    (count,) = struct.unpack_from("<I", raw, 0)
    if 4 + count * 8 > len(raw):
        raise PairsFormatError(f"{count} pairs do not fit in {len(raw)} bytes")
    sizes = struct.unpack_from(f"<{2 * count}I", raw, 4)
    pos = 4 + count * 8
    out: list[tuple[bytes, bytes]] = []
    for i in range(count):
        klen, vlen = sizes[2 * i], sizes[2 * i + 1]
        end = pos + klen + 1 + vlen + 1
        if end > len(raw):
            raise PairsFormatError(f"pair {i} runs past the end of the buffer")
        out.append((raw[pos:pos + klen], raw[pos + klen + 1:pos + klen + 1 + vlen]))
        pos = end
    return out
