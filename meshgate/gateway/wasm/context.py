"""The host side of proxy-wasm contexts: what a root or HTTP stream context holds.

The import table (``imports.py``) resolves the plugin's *effective* context and asks it
for maps and buffers by ABI type; the plugin host (``host.py``) drives callbacks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .abi import BufferType, MapType, Status
from .headers import HeaderMap

ROOT_CONTEXT_ID = 1


class Buffer:
    """A byte buffer a plugin may read and (if ``mutable``) edit, with Envoy's edit rules.

    Envoy's ``Buffer::copyFrom``: ``start == 0`` drops the first ``length`` bytes and
    prepends the data (so ``(0, len(body), new)`` replaces the body); ``start >= len``
    appends; anything else is BAD_ARGUMENT. Immutable buffers answer BAD_ARGUMENT.
    """

    __slots__ = ("data", "mutable")

    def __init__(self, data: bytes | bytearray, mutable: bool = False) -> None:
        self.data = data if isinstance(data, bytearray) and mutable else (
            bytearray(data) if mutable else bytes(data))
        self.mutable = mutable

    def slice(self, start: int, max_size: int) -> bytes:
        return bytes(self.data[start:start + max_size])

    def copy_from(self, start: int, length: int, value: bytes) -> Status:
        if not self.mutable:
            return Status.BAD_ARGUMENT
        assert isinstance(self.data, bytearray)
        if start == 0:
            del self.data[:length]
            self.data[0:0] = value
            return Status.OK
        if start >= len(self.data):
            self.data += value
            return Status.OK
        return Status.BAD_ARGUMENT


@dataclass(slots=True)  # built once per plugged request: slots spare it a dict
class StreamInfo:
    """What the data path knows about a request before the plugin sees its headers.

    Addresses are ``ip:port`` strings as in Envoy's properties; left empty, they come from
    ``connection`` (an asyncio transport's ``peername``/``sockname``) when a plugin first
    asks (``address``): few plugins do, and the data path builds one of these for every
    plugged request. ``traceparent`` /
    ``tracestate`` carry the W3C context of the stream's span (the parent of spans a plugin
    records through ``wasi:tracing``); ``span`` is an opaque object (an OpenTelemetry span)
    handed to foreign functions.
    """

    source_address: str = ""
    destination_address: str = ""
    request_id: str = ""
    traceparent: str | None = None
    tracestate: str | None = None
    span: Any = None
    connection: Any = None
    route_name: str = ""
    cluster_name: str = ""
    virtual_host_name: str = ""
    connection_id: int = 0
    protocol: str = "HTTP/1.1"
    mtls: bool = False
    requested_server_name: str = ""
    upstream_address: str = ""
    start_time_ns: int = field(default_factory=time.time_ns)
    #: What plugins set with ``proxy_set_property``: the stream's filter state, shared by
    #: all the plugins of the request as in Envoy. None until one sets something.
    filter_state: dict[bytes, bytes] | None = None

    def address(self, side: str) -> str:
        """``source_address`` (``side`` "source") or ``destination_address``."""
        source = side == "source"
        known = self.source_address if source else self.destination_address
        if known or self.connection is None:
            return known
        name = self.connection.get_extra_info("peername" if source else "sockname")
        found = f"{name[0]}:{name[1]}" if name else ""
        if source:
            self.source_address = found
        else:
            self.destination_address = found
        return found


@dataclass
class HttpCallResponse:
    """The response of one ``proxy_http_call``, visible during its callback."""

    headers: HeaderMap
    body: Buffer
    trailers: HeaderMap


class Context:
    """Base: a context id, and no maps or buffers.

    ``header_map``/``buffer`` take the ABI's plain int (compared with ``==`` against the
    enums): the import table skips building an enum member on every host call.
    """

    # Slotted, so that a stream context (one per plugin and plugged request) carries no
    # instance dict to make and free.
    __slots__ = ("foreign_call",)
    id: int

    def __init__(self) -> None:
        #: The ``ForeignCall`` foreign functions get from this context, built by the plugin
        #: host on first use (its fields are constant for the context's life).
        self.foreign_call: Any = None

    def header_map(self, map_type: int) -> HeaderMap | None:
        return None

    def buffer(self, buffer_type: int) -> Buffer | None:
        return None


class RootContext(Context):
    """Context 1 of a VM: configuration, ticks, and the response of an http_call being
    delivered (Envoy 1.40 delivers ``on_http_call_response`` to the root context)."""

    def __init__(self, vm_configuration: bytes, plugin_configuration: bytes) -> None:
        super().__init__()
        self.id = ROOT_CONTEXT_ID
        self.vm_configuration = Buffer(vm_configuration)
        self.plugin_configuration = Buffer(plugin_configuration)
        #: Set only while on_configure runs: Envoy answers NOT_FOUND for it elsewhere.
        self.configuring = False
        self.call_response: HttpCallResponse | None = None
        self.foreign_args: Buffer | None = None

    def header_map(self, map_type: int) -> HeaderMap | None:
        if self.call_response is None:
            return None
        if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS:
            return self.call_response.headers
        if map_type == MapType.HTTP_CALL_RESPONSE_TRAILERS:
            return self.call_response.trailers
        return None

    def buffer(self, buffer_type: int) -> Buffer | None:
        if buffer_type == BufferType.VM_CONFIGURATION:
            return self.vm_configuration
        if buffer_type == BufferType.PLUGIN_CONFIGURATION:
            return self.plugin_configuration if self.configuring else None
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY and self.call_response:
            return self.call_response.body
        return None


@dataclass
class LocalReplyRequest:
    """What ``proxy_send_local_response`` asked for."""

    status: int
    details: str
    body: bytes
    headers: list[tuple[str, str]]
    grpc_status: int


class StreamContext(Context):
    """One HTTP stream's context: its maps and bodies as the plugin sees them."""

    __slots__ = ("id", "info", "root", "request_headers", "request_trailers",
                 "response_headers", "response_trailers", "request_body", "response_body",
                 "request_body_bytes", "response_code", "response_code_details",
                 "local_reply", "resume", "continued", "failed",
                 "reset_requested")

    def __init__(self, context_id: int, info: StreamInfo, root: RootContext) -> None:
        super().__init__()
        self.id = context_id
        self.info = info
        self.root = root
        self.request_headers: HeaderMap | None = None
        self.request_trailers: HeaderMap | None = None
        self.response_headers: HeaderMap | None = None
        self.response_trailers: HeaderMap | None = None
        # Made when first asked for: most streams never see a body callback's buffer.
        self.request_body: Buffer | None = None
        self.response_body: Buffer | None = None
        self.request_body_bytes = 0
        self.response_code: int | None = None
        self.response_code_details: str | None = None
        self.local_reply: LocalReplyRequest | None = None
        #: Resolved when the plugin resumes a paused stream or sends a local reply.
        self.resume: asyncio.Future[None] | None = None
        self.continued = False
        #: The VM trapped while this stream waited (e.g. in on_http_call_response).
        self.failed = False
        self.reset_requested = False

    def header_map(self, map_type: int) -> HeaderMap | None:
        if map_type == MapType.HTTP_REQUEST_HEADERS:
            return self.request_headers
        if map_type == MapType.HTTP_REQUEST_TRAILERS:
            return self.request_trailers
        if map_type == MapType.HTTP_RESPONSE_HEADERS:
            return self.response_headers
        if map_type == MapType.HTTP_RESPONSE_TRAILERS:
            return self.response_trailers
        return self.root.header_map(map_type)

    def buffer(self, buffer_type: int) -> Buffer | None:
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            if self.request_body is None:
                self.request_body = Buffer(bytearray(), mutable=True)
            return self.request_body
        if buffer_type == BufferType.HTTP_RESPONSE_BODY:
            if self.response_body is None:
                self.response_body = Buffer(bytearray(), mutable=True)
            return self.response_body
        return self.root.buffer(buffer_type)

    def wake(self) -> None:
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)
