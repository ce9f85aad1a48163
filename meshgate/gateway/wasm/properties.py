"""``proxy_get_property``: Envoy's attribute names and byte encodings.

Paths arrive as NUL-joined segments (``request\\0path``). Encodings follow what Envoy 1.40
returns (reference §3, §5): strings raw, integers 8-byte little-endian, booleans one byte,
timestamps 8-byte little-endian nanoseconds. Where Envoy answers NOT_FOUND (e.g.
``response.code`` before the response, the old ``node.*`` names) so do we.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

from ._rawcall import compiled_function
from .abi import Status, serialize_pairs
from .context import Context, StreamContext


@dataclass(frozen=True, slots=True)
class PluginIdentity:
    name: str
    root_id: str
    vm_id: str
    node_id: str
    node_cluster: str


def _int(v: int) -> bytes:
    return struct.pack("<q", v)


def _port(address: str) -> int | None:
    host, sep, port = address.rpartition(":")
    return int(port) if sep and port.isdigit() else None


def _header(ctx: StreamContext, name: str) -> str | None:
    return ctx.request_headers.joined(name) if ctx.request_headers is not None else None


def _path(ctx: StreamContext) -> bytes | None:
    path = _header(ctx, ":path")
    return path.encode() if path is not None else None


def _address(ctx: StreamContext, side: str) -> bytes | None:
    """``source.address`` (``side`` "source") or ``destination.address``."""
    address = ctx.info.address(side)
    return address.encode() if address else None


def _request(ctx: StreamContext, field: str) -> bytes | None:
    if field == "path":
        return _path(ctx)
    path = _header(ctx, ":path")
    if field == "url_path":
        return urlsplit(path).path.encode() if path is not None else None
    if field == "query":
        return urlsplit(path).query.encode() if path is not None else None
    simple = {"host": ":authority", "scheme": ":scheme", "method": ":method",
              "useragent": "user-agent", "referer": "referer", "id": "x-request-id"}
    if field in simple:
        value = _header(ctx, simple[field])
        if value is None and field == "id" and ctx.info.request_id:
            value = ctx.info.request_id
        return value.encode() if value is not None else None
    if field == "protocol":
        return ctx.info.protocol.encode()
    if field == "time":
        return _int(ctx.info.start_time_ns)
    if field == "headers_bytes":
        headers = ctx.request_headers.items() if ctx.request_headers is not None else []
        return _int(sum(len(k) + len(v) for k, v in headers))
    if field in ("size", "total_size"):
        return _int(ctx.request_body_bytes)
    return None


def _stream_property(ctx: StreamContext, ident: PluginIdentity,
                     segs: list[str]) -> bytes | None:
    info = ctx.info
    top, rest = segs[0], segs[1:]
    if top == "request":
        if rest[:1] == ["headers"] and len(rest) == 2:
            value = _header(ctx, rest[1])
            return value.encode() if value is not None else None
        if rest == ["headers"] and ctx.request_headers is not None:
            return serialize_pairs([(k.encode(), v.encode()) for k, v in ctx.request_headers])
        return _request(ctx, rest[0]) if len(rest) == 1 else None
    if top in ("source", "destination") and len(rest) == 1:
        if rest[0] == "address":
            return _address(ctx, top)
        if rest[0] == "port":
            port = _port(info.address(top))
            return _int(port) if port is not None else None
        return None
    if top == "connection" and len(rest) == 1:
        return {
            "id": _int(info.connection_id),
            "mtls": bytes([1 if info.mtls else 0]),
            "requested_server_name": info.requested_server_name.encode(),
        }.get(rest[0])
    if top == "upstream" and len(rest) == 1 and ctx.response_headers is not None:
        if rest[0] == "address" and info.upstream_address:
            return info.upstream_address.encode()
        if rest[0] == "port":
            port = _port(info.upstream_address)
            return _int(port) if port is not None else None
        return None
    if top == "response" and len(rest) == 1:
        if rest[0] == "code" and ctx.response_code is not None:
            return _int(ctx.response_code)
        if rest[0] == "code_details" and ctx.response_code_details is not None:
            return ctx.response_code_details.encode()
        if rest[0] == "size":
            return _int(len(ctx.response_body.data) if ctx.response_body is not None else 0)
        return None
    if top == "xds" and len(rest) == 1:
        return {
            "cluster_name": info.cluster_name.encode(),
            "route_name": info.route_name.encode(),
            "virtual_host_name": info.virtual_host_name.encode(),
            "listener_direction": _int(0),
            "filter_chain_name": b"",
        }.get(rest[0])
    return None


_PLUGIN: dict[str, Callable[[PluginIdentity], bytes]] = {
    "plugin_name": lambda i: i.name.encode(),
    "plugin_root_id": lambda i: i.root_id.encode(),
    "plugin_vm_id": lambda i: i.vm_id.encode(),
}


#: The stream properties plugins read on every request (a rate limit keyed by client
#: address, a policy on the path), answered without parsing the path; what they answer
#: is what `_stream_property` answers for the same names (decision 2400).
_EVERY_REQUEST: dict[bytes, Callable[[StreamContext], bytes | None]] = {
    b"source\0address": partial(_address, side="source"),
    b"destination\0address": partial(_address, side="destination"),
    b"request\0path": _path,
}


def get_property(ctx: Context, ident: PluginIdentity, raw_path: bytes) -> tuple[Status, bytes]:
    """Answer ``proxy_get_property`` for ``raw_path`` in context ``ctx``."""
    if not raw_path:
        return Status.SERIALIZATION_FAILURE, b""
    if isinstance(ctx, StreamContext):
        state = ctx.info.filter_state
        if state and raw_path in state:
            return Status.OK, state[raw_path]
        read = _EVERY_REQUEST.get(raw_path)
        if read is not None:
            value = read(ctx)
            return (Status.OK, value) if value is not None else (Status.NOT_FOUND, b"")
    segs = raw_path.decode("utf-8", "replace").rstrip("\0").split("\0")
    if len(segs) == 1 and segs[0] in _PLUGIN:
        return Status.OK, _PLUGIN[segs[0]](ident)
    if segs == ["xds", "node", "id"] or segs == ["xds", "node", "cluster"]:
        return Status.OK, (ident.node_id if segs[2] == "id" else ident.node_cluster).encode()
    if segs[0] == "filter_state":
        return Status.SERIALIZATION_FAILURE, b""
    if segs == ["metadata"]:
        return Status.OK, b""
    if isinstance(ctx, StreamContext):
        value = _stream_property(ctx, ident, segs)
        if value is not None:
            return Status.OK, value
    return Status.NOT_FOUND, b""


def set_property(ctx: Context, raw_path: bytes, value: bytes) -> Status:
    """Envoy keeps plugin-set properties in the stream's filter state; a later get on the
    same path returns them, to any plugin of the stream. Outside a stream there is
    nowhere to keep them."""
    if not raw_path:
        return Status.SERIALIZATION_FAILURE
    if not isinstance(ctx, StreamContext):
        return Status.NOT_FOUND
    if ctx.info.filter_state is None:
        ctx.info.filter_state = {}
    ctx.info.filter_state[raw_path] = bytes(value)
    return Status.OK


#: The compiled ``proxy_get_property`` (``_fastpaths.h``) answers through this module's
#: ``get_property``: the names and encodings stay defined here alone.
_configure = compiled_function("configure_properties")
if _configure is not None:
    _configure(get_property)
