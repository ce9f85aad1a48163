"""meshgate's proxy-wasm host: Envoy's plugins (ABI 0.2.1) under wasmtime.

The data path (``meshgate/gateway``) drives it; the host knows nothing of aiohttp or xDS.

Loading::

    services = HostServices(http_dispatcher=..., module_cache_dir=Path(...))
    host = await PluginHost.create(PluginSpec(name, wasm, configuration,
                                              root_id=..., vm_id=..., fail_open=False),
                                   services)        # raises PluginLoadError

``HostServices`` is shared by every plugin of one process: the wasmtime engine and its
epoch clock (per-callback CPU deadline ``callback_deadline_s``), the per-VM memory cap
``memory_limit_bytes``, shared data (CAS) and shared queues keyed by vm_id, the Prometheus
registry plugin metrics go to (``wasmcustom_<name>``), foreign functions (Envoy's
``compress``/``uncompress`` and, via ``meshgate.otel.wasi_tracing``, ``wasi:tracing/*``),
node id/cluster for properties, the module cache directory, and the ``HttpCallDispatcher``:
``async (cluster, headers, body, trailers, timeout_s) -> (headers, body, trailers)`` with
pseudo-headers included both ways, plus ``has_cluster(name)`` (unknown clusters answer
BAD_ARGUMENT to the plugin, as in Envoy).

Per request::

    stream = host.new_stream(StreamInfo(source_address="10.0.0.1:5555", ...))
    action = await stream.request_headers(headers, end_of_stream=False)
    # Continue | StopAndBuffer (body: buffer, call again with the accumulated body)
    # | LocalReply(status, headers, body, details) | ResetStream
    ...
    stream.finish()                # on_log, on_done, on_delete (synchronous)

``HeaderMap`` and body ``bytearray``s are edited in place by the plugin (pass bodies as
``bytearray`` to see the edits); a ``LiveHeaderMap(pseudo, headers)`` shows the plugin a
``CIMultiDict`` of the caller's own, which its edits change in place. A ``LocalReply``
already went through this plugin's ``on_response_headers``/``on_response_body`` (as in
Envoy); do not call the stream's response methods afterwards. A trap applies the plugin's
failure policy (fail closed: ``LocalReply(503)`` with an empty body; fail open: the plugin
is skipped for the rest of the stream), logs one line naming plugin, sha256 prefix,
callback and trap, and the next stream gets a fresh VM. ``await host.close()`` stops
ticks and pending calls; ``services.close()`` stops the epoch clock.
"""

from .actions import (
    CONTINUE,
    STOP_AND_BUFFER,
    Continue,
    LocalReply,
    PluginLoadError,
    PluginSpec,
    ResetStream,
    StopAndBuffer,
    StreamAction,
)
from .context import Buffer, StreamInfo
from .headers import HeaderMap, LiveHeaderMap
from .host import PluginHost
from .phases import body_phase, compile_chain, edited_pseudo, headers_phase, stream_info
from .services import ForeignCall, ForeignFunction, HostServices, HttpCallDispatcher
from .stream import (
    REQUEST_HEADERS,
    RESPONSE_BODY,
    RESPONSE_HEADERS,
    HttpStream,
    drive_phase,
    finish_across,
    finish_streams,
    open_streams,
)

__all__ = [
    "CONTINUE",
    "REQUEST_HEADERS",
    "RESPONSE_BODY",
    "RESPONSE_HEADERS",
    "STOP_AND_BUFFER",
    "Buffer",
    "Continue",
    "ForeignCall",
    "ForeignFunction",
    "HeaderMap",
    "HostServices",
    "HttpCallDispatcher",
    "HttpStream",
    "LiveHeaderMap",
    "LocalReply",
    "PluginHost",
    "PluginLoadError",
    "PluginSpec",
    "ResetStream",
    "StopAndBuffer",
    "StreamAction",
    "StreamInfo",
    "body_phase",
    "compile_chain",
    "drive_phase",
    "edited_pseudo",
    "finish_across",
    "finish_streams",
    "headers_phase",
    "open_streams",
    "stream_info",
]
