"""The wasm filter chain of a listener, driven from the data path.

Plugins run in filter order on the request and in reverse order on the response, as in
Envoy. A plugin that stops a stream to see its body (`StopAndBuffer`) makes the data path
buffer that body, within a limit; otherwise bodies stream and plugins see headers only.
The proxy-wasm host (`meshgate.gateway.wasm`) knows nothing of aiohttp: this module
turns aiohttp requests into `HeaderMap`s with pseudo-headers and the host's actions back
into what the data path does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from yarl import URL

from meshgate.gateway.plugin_resources import PluginBinaryCache, PluginResource
from meshgate.gateway.resources import UnsupportedConfig
from meshgate.otel import WasiTracing

if TYPE_CHECKING:
    from meshgate.gateway.config import ConfigHolder, SidecarConfig

log = logging.getLogger("meshgate.sidecar.plugins")


@dataclass(frozen=True)
class LocalReply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    details: str = ""


_WASM: Any = None


def _wasm() -> Any:
    # Imported late: the host module pulls in wasmtime, which a sidecar without plugins
    # (and the unit tests of routing) never needs. Cached: this runs several times a request.
    global _WASM
    if _WASM is None:
        from meshgate.gateway import wasm

        if wasm.compile_chain is not None:  # the compiled driver runs the chain's phases too
            template = PluginChain([], 0)
            for name, method in wasm.compile_chain(template, _PYTHON_START).items():
                setattr(PluginChain, name, method)
        _WASM = wasm
    return _WASM


class PluginReplied(Exception):
    """A plugin answered while the body was flowing; the data path sends `reply`."""

    def __init__(self, reply: LocalReply) -> None:
        super().__init__(f"{reply.status} {reply.details}")
        self.reply = reply


class StreamReset(Exception):
    """A plugin closed the stream (`proxy_close_stream`): reset without a reply."""


class BodyTooLarge(Exception):
    """A plugin held more body than the configured buffer limit."""


def _outcome(action: Any) -> str:
    """The host's action → "continue", "buffer", or raise for a reply or a reset."""
    wasm = _WASM or _wasm()
    if action is wasm.CONTINUE:  # the host's singleton: the common case, one identity test
        return "continue"
    if isinstance(action, wasm.LocalReply):
        headers = tuple((k, v) for k, v in action.headers if not k.startswith(":"))
        reply = LocalReply(action.status, headers, bytes(action.body or b""), action.details or "")
        raise PluginReplied(reply)
    if isinstance(action, wasm.ResetStream):
        raise StreamReset()
    return "buffer" if isinstance(action, wasm.StopAndBuffer) else "continue"


class PluginChain:
    """One request's streams, one per plugin of the listener.

    Bodies flow through the plugins chunk by chunk, as Envoy's filters see them; a plugin
    answering `StopAndBuffer` holds the data (its own buffer, up to `limit` bytes) and is
    called again with everything it holds as more arrives, until it continues or the
    body ends. Nothing is buffered unless a plugin asks.
    """

    __slots__ = ("streams", "reversed_streams", "limit", "path", "status", "responded")

    def __init__(self, streams: list[Any], limit: int) -> None:
        self.streams = streams
        #: The response's order (Envoy's encoder filters run last to first).
        self.reversed_streams = streams[::-1]
        self.limit = limit
        self.path: str | None = None
        self.status: int | None = None
        #: Whether the plugins have seen response headers (an upstream's, or a reply's).
        self.responded = False

    @classmethod
    def start(
        cls, plugins: Sequence[Any], request: web.BaseRequest, span: Any, limit: int,
        w3c: tuple[str, str] | None, route_name: str = "", cluster_name: str = "",
    ) -> PluginChain:
        """`w3c`: the request span's (traceparent, tracestate) (`tracing.w3c_context`);
        the route and its cluster are the plugins' `xds.route_name`/`xds.cluster_name`."""
        # One StreamInfo for all the plugins of the request: the host only reads it.
        info = _stream_info(request, span, w3c, route_name, cluster_name)
        return cls((_WASM or _wasm()).open_streams(plugins, info), limit)

    async def request_headers(
        self, method: str, path: str, headers: CIMultiDict[str], request: web.BaseRequest
    ) -> None:
        rest = self.begin_request_headers(method, path, headers, request)
        if rest is not None:
            await rest

    def begin_request_headers(
        self, method: str, path: str, headers: CIMultiDict[str], request: web.BaseRequest
    ) -> Awaitable[None] | None:
        """Run the plugins over the request headers, in filter order; edits land in
        `headers` and `self.path`. Raises PluginReplied / StreamReset.

        None when every plugin decided at once, the common case, with no coroutine made
        (decision 1600); else what is left, to await.
        """
        wasm = _WASM or _wasm()
        end = not request.body_exists
        out = wasm.headers_phase(self.streams, wasm.REQUEST_HEADERS, [
            (":method", method), (":path", path), (":authority", request.host),
            (":scheme", request.scheme)], headers, end, None, ":path")
        if out.__class__ is not tuple:  # settled: None, or the :path a plugin set
            self.path = out
            return None
        return self._request_rest(out, end)

    def _request_rest(self, out: tuple[Any, tuple[int, Any]], end: bool) -> Awaitable[None]:
        """The request headers' phase after a plugin did not continue: `out` is
        `headers_phase`'s (map, (index, action))."""
        hmap, stopped = out
        rest = self._rest_of_phase(self.streams, stopped, (_WASM or _wasm()).REQUEST_HEADERS,
                                   hmap, end, None)
        return self._then(rest, self._request_edits, hmap)

    def _request_edits(self, hmap: Any) -> None:
        self.path = (_WASM or _wasm()).edited_pseudo(hmap, ":path")

    async def response_headers(self, status: int, headers: CIMultiDict[str]) -> None:
        rest = self.begin_response_headers(status, headers)
        if rest is not None:
            await rest

    def begin_response_headers(self, status: int,
                               headers: CIMultiDict[str]) -> Awaitable[None] | None:
        """As `begin_request_headers`, in reverse filter order: edits land in `headers`
        and `self.status`."""
        self.responded = True
        wasm = _WASM or _wasm()
        streams = self.reversed_streams
        out = wasm.headers_phase(streams, wasm.RESPONSE_HEADERS, [(":status", str(status))],
                                 headers, False, status, ":status")
        if out.__class__ is not tuple:  # settled: None, or the :status a plugin set
            if out is not None:
                self.status = _status_code(out)
            return None
        return self._response_rest(out, status)

    def _response_rest(self, out: tuple[Any, tuple[int, Any]], status: int) -> Awaitable[None]:
        """As `_request_rest`, for the response headers."""
        hmap, stopped = out
        rest = self._rest_of_phase(self.reversed_streams, stopped,
                                   (_WASM or _wasm()).RESPONSE_HEADERS, hmap, False, status)
        return self._then(rest, self._response_edits, hmap)

    def _response_edits(self, hmap: Any) -> None:
        edited = (_WASM or _wasm()).edited_pseudo(hmap, ":status")
        if edited is not None:
            self.status = _status_code(edited)

    @staticmethod
    async def _then(rest: Awaitable[None], after: Callable[[Any], None], hmap: Any) -> None:
        await rest
        after(hmap)

    @staticmethod
    async def _rest_of_phase(streams: list[Any], stopped: tuple[int, Any] | None, phase: int,
                             payload: Any, end: bool, code: int | None) -> None:
        """A phase after a plugin did not continue (`wasm.drive_phase` answered the index
        and action of the first that did not): its action is carried out (a pause
        awaited), then the phase goes on with the next plugin. A phase where every plugin
        continued, the common case, is settled without this coroutine."""
        while stopped is not None:
            index, action = stopped
            _outcome(action if action is not None else await streams[index].resumed())
            stopped = _WASM.drive_phase(streams, index + 1, phase, payload, end, code)

    @property
    def may_change_request_body(self) -> bool:
        """Whether any plugin of the chain has a request-body callback (only those can
        edit the body, so without one the client's framing stays valid)."""
        return any(s.exports("proxy_on_request_body") for s in self.streams)

    def request_body(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return self._body([s.request_body for s in self.streams], source)

    def response_body(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return self._body([s.response_body for s in reversed(self.streams)], source)

    async def whole_response_body(self, body: bytes) -> bytes:
        out = self.begin_whole_response_body(body)
        return out if isinstance(out, bytes) else await out

    def begin_whole_response_body(self, body: bytes) -> bytes | Awaitable[bytes]:
        """The response body already read whole: one pass with end_of_stream. The body
        after the plugins, or, when one paused, a coroutine for it.

        What `_body` does for a single last chunk, without its generators: each plugin
        (reverse order) sees the body in one shared buffer, edits it in place, and the
        next sees the edits; a `StopAndBuffer` at end of stream is a continue.
        """
        wasm = _WASM or _wasm()
        streams = self.reversed_streams
        out = wasm.body_phase(streams, body)
        if out.__class__ is bytes:
            return out
        return self._body_rest(out)

    def _body_rest(self, out: tuple[Any, tuple[int, Any]]) -> Awaitable[bytes]:
        """As `_request_rest`, for a response body read whole."""
        buffer, stopped = out
        rest = self._rest_of_phase(self.reversed_streams, stopped,
                                   (_WASM or _wasm()).RESPONSE_BODY, buffer, True, None)
        return self._body_after(rest, buffer)

    @staticmethod
    async def _body_after(rest: Awaitable[None], buffer: Any) -> bytes:
        await rest
        return bytes(buffer.data)

    async def _body(
        self, callbacks: list[Any], source: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        held = [bytearray() for _ in callbacks]
        iterator = source.__aiter__()
        pending: bytes | None = await next_chunk(iterator)
        while pending is not None:
            following = await next_chunk(iterator)
            end = following is None
            out = await self._through(callbacks, held, pending, end)
            if out:
                yield out
            pending = following
            if end:
                return
        # An empty body (or one that ended on a chunk boundary) still reaches the plugins
        # with end_of_stream, so a buffering plugin gets to decide.
        out = await self._through(callbacks, held, b"", True)
        if out:
            yield out

    async def _through(
        self, callbacks: list[Any], held: list[bytearray], data: bytes, end: bool
    ) -> bytes:
        for i, callback in enumerate(callbacks):
            held[i] += data
            if _outcome(await callback(held[i], end)) == "buffer" and not end:
                if len(held[i]) > self.limit:
                    raise BodyTooLarge(f"plugin buffered over {self.limit} bytes")
                return b""
            data, held[i] = bytes(held[i]), bytearray()
        return data

    def finish(self) -> None:
        """Each stream's closing callbacks, now. Synchronous, as the host's ``finish``;
        the data path queues its chains on a ``FinishBatch`` instead."""
        _log_finish_errors((_WASM or _wasm()).finish_streams(self.streams))


#: PluginChain's own start and phases. Where the compiled driver runs, the first use of the
#: wasm package puts C methods in their place (`_chain.h`, decision 2600); these stay the
#: reference the tests hold them to.
PYTHON_CHAIN_METHODS: dict[str, Any] = {
    name: PluginChain.__dict__[name]
    for name in ("start", "begin_request_headers", "begin_response_headers",
                 "begin_whole_response_body")
}
_PYTHON_START = PYTHON_CHAIN_METHODS["start"].__func__


class QueuedPhase:
    """A request's request-headers phase, queued on a `RequestBatch`. Awaiting it resumes
    the request on the event loop's next pass, after the batch ran the phase, with what
    `PluginChain.begin_request_headers` gave: None, or what is left to await; its
    `PluginReplied` or `StreamReset` is raised there."""

    __slots__ = ("chain", "args", "rest", "error", "ran")

    def __init__(self, chain: PluginChain, args: tuple[Any, ...]) -> None:
        self.chain = chain
        self.args = args
        self.rest: Awaitable[None] | None = None
        self.error: Exception | None = None
        self.ran = False

    def run(self) -> None:
        self.ran = True
        try:
            self.rest = self.chain.begin_request_headers(*self.args)
        except Exception as exc:
            self.error = exc

    def __await__(self) -> Generator[None, None, Awaitable[None] | None]:
        # A bare yield: asyncio's task resumes on the next pass, behind the batch's flush,
        # which was scheduled first.
        yield
        if not self.ran:  # the pass never got to it (it failed earlier): the phase runs now
            self.run()
        error, self.error = self.error, None  # the traceback's frames must not hold it
        if error is not None:
            raise error
        return self.rest


class RequestBatch:
    """The request-headers phases of the plugged requests one pass of the event loop
    brings, run together on the next pass (decision 3100).

    Under load one pass runs several requests' handlers one after another. Run inside
    each handler, the plugins' code and memories started cold every time, among the data
    path's own work, and that work in turn ran slower after them. Queued here, each
    request waits one pass; the batch then runs every queued request's phase in a row,
    so the plugins run warm after the first request, and the handlers resume in a row
    after the batch. On a loop with nothing else ready (a lone request) the phase runs at
    once: there is nothing to batch with, so nothing waits. A batch of one request is
    the wait for nothing: after one, the next `AT_ONCE_AFTER_ALONE` phases run at once
    (under a light load, the ready work is seldom another plugged request).
    """

    AT_ONCE_AFTER_ALONE = 16

    __slots__ = ("_queued", "_sizes", "_at_once")

    def __init__(self, sizes: Any = None) -> None:
        self._queued: list[QueuedPhase] = []
        #: A histogram observing each flush's request count (None: not exported).
        self._sizes = sizes
        #: How many more phases run at once, not queued, after a batch of one.
        self._at_once = 0

    def begin_request_headers(
        self, chain: PluginChain, method: str, path: str, headers: CIMultiDict[str],
        request: web.BaseRequest,
    ) -> QueuedPhase | Awaitable[None] | None:
        """`chain.begin_request_headers(...)`, or, when other work is ready this pass, the
        phase queued: a `QueuedPhase` to await for the same answer."""
        queued = self._queued
        if not queued:
            if self._at_once:
                self._at_once -= 1
                return chain.begin_request_headers(method, path, headers, request)
            loop = asyncio.get_running_loop()
            # asyncio's loop keeps what is ready to run in `_ready`; a loop without it
            # (another implementation) batches, at the cost of one pass's wait.
            if not getattr(loop, "_ready", True):
                return chain.begin_request_headers(method, path, headers, request)
            loop.call_soon(self.flush)
        phase = QueuedPhase(chain, (method, path, headers, request))
        queued.append(phase)
        return phase

    def __len__(self) -> int:
        return len(self._queued)

    def flush(self) -> None:
        queued, self._queued = self._queued, []
        if len(queued) == 1:
            self._at_once = self.AT_ONCE_AFTER_ALONE
        for phase in queued:
            phase.run()
        if self._sizes is not None and queued:
            self._sizes.observe(len(queued))


class FinishBatch:
    """The closing callbacks of plugged requests, run together once per event-loop pass.

    A request's ``on_done``/``on_log``/``on_delete`` need no answer: they run after the
    response is out, as Envoy runs them when a stream ends, not on the response's path.
    Under load one loop pass ends several plugged requests; their streams are finished
    plugin by plugin, so each plugin's closing code runs warm after its first request
    (decision 1800). The queued requests hold their config snapshots (and with them the
    plugin hosts) until their callbacks have run: one hold for each run of requests on the
    same snapshot, so a batch releases once per snapshot, not once per request.
    """

    __slots__ = ("_holder", "_queued", "_held", "_sizes")

    def __init__(self, holder: ConfigHolder, sizes: Any = None) -> None:
        self._holder = holder
        self._queued: list[PluginChain] = []
        self._held: list[SidecarConfig] = []
        #: A histogram observing each flush's request count (None: not exported).
        self._sizes = sizes

    def add(self, chain: PluginChain, config: SidecarConfig) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self._queued.append(chain)
        held = self._held
        if not held or held[-1] is not config:
            config.inflight += 1  # released by flush(), after the callbacks
            held.append(config)

    def __len__(self) -> int:
        return len(self._queued)

    def flush(self) -> None:
        """Finish everything queued now (also before the plugin hosts close)."""
        queued, held = self._queued, self._held
        if not queued:
            return
        self._queued, self._held = [], []
        try:
            # Plugin by plugin across the requests; within a request, filter order.
            _log_finish_errors((_WASM or _wasm()).finish_across(
                [chain.streams for chain in queued]))
        finally:
            for config in held:
                self._holder.release(config)
        if self._sizes is not None:
            self._sizes.observe(len(queued))


def _log_finish_errors(errors: list[Exception] | None) -> None:
    # A plugin failing in on_done must not fail the response, nor stop the others.
    for exc in errors or ():
        log.error("plugin stream finish failed", exc_info=exc)


def _status_code(text: str) -> int | None:
    """A `:status` a plugin set, as a number; None (the upstream's stays) for one that is
    not ASCII digits (`str.isdigit` alone passes `²`, which `int` refuses)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _stream_info(request: web.BaseRequest, span: Any, w3c: tuple[str, str] | None,
                 route_name: str = "", cluster_name: str = "") -> Any:
    traceparent, tracestate = w3c if w3c is not None else (None, None)
    # The addresses come from the transport if a plugin asks.
    return (_WASM or _wasm()).stream_info(
        request.headers.get("x-request-id", ""), traceparent, tracestate or None, span,
        request.transport, route_name, cluster_name)


async def next_chunk(iterator: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


class ClusterCallDispatcher:
    """`proxy_http_call` for plugins: sent through the current config's clusters."""

    def __init__(self, holder: ConfigHolder) -> None:
        self.holder = holder

    def has_cluster(self, name: str) -> bool:
        current = self.holder.current
        return current is not None and name in current.clusters

    async def __call__(
        self,
        cluster: str,
        headers: list[tuple[str, str]],
        body: bytes,
        trailers: list[tuple[str, str]],
        timeout_s: float,
    ) -> tuple[list[tuple[str, str]], bytes, list[tuple[str, str]]]:
        current = self.holder.current
        upstream = current.clusters.get(cluster) if current else None
        if upstream is None:
            raise LookupError(f"unknown cluster {cluster!r}")
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        plain = CIMultiDict((k, v) for k, v in headers if not k.startswith(":"))
        if ":authority" in pseudo:
            plain["host"] = pseudo[":authority"]
        endpoint = upstream.pick()
        url = URL(f"http://{endpoint.host}:{endpoint.port}{pseudo.get(':path', '/')}", encoded=True)
        async with asyncio.timeout(timeout_s):
            async with upstream.session.request(
                pseudo.get(":method", "GET"), url, headers=plain, data=body or None,
                allow_redirects=False,
            ) as resp:  # fmt: skip
                data = await resp.read()
                out = [(":status", str(resp.status))] + [
                    (k.lower(), v) for k, v in resp.headers.items()
                ]
                return out, data, []


class PluginLoader:
    """Plugin VMs by resource: fetched, sha256-checked, instantiated, reused across updates."""

    def __init__(self, holder: ConfigHolder, registry: CollectorRegistry, options: Any,
                 tracer_provider: Any = None) -> None:
        self.holder = holder
        self._tracer_provider = tracer_provider
        self.binaries = PluginBinaryCache()
        self._registry = registry
        self._options = options
        self._services: Any = None
        self._hosts: dict[PluginResource, Any] = {}
        # Replaced or removed hosts, closed once no snapshot in use references them
        # (their tick and http_call tasks would otherwise run forever).
        self._retired: list[Any] = []

    def services(self) -> Any:
        if self._services is None:
            wasm = _wasm()
            self._services = wasm.HostServices(
                http_dispatcher=ClusterCallDispatcher(self.holder),
                node_id=self._options.node_id,
                node_cluster=self._options.node_cluster,
                metrics_registry=self._registry,
                module_cache_dir=self._options.module_cache_dir,
            )
            # Plugins' wasi:tracing spans become children of the request's span, exported
            # with the sidecar's own (docs/internals.md); Envoy answers these NotFound.
            self._services.foreign_functions.update(
                WasiTracing(self._tracer_provider).functions())
        return self._services

    async def load_all(self, resources: dict[str, PluginResource]) -> None:
        """Load every plugin of an ECDS response, or raise naming the one that failed."""
        for plugin in resources.values():
            if plugin not in self._hosts:
                self._hosts[plugin] = await self._load(plugin)
        live = set(resources.values())
        for plugin in set(self._hosts) - live:
            self._retired.append(self._hosts.pop(plugin))
        self.binaries.retain({p.sha256 for p in live})

    def take_unused(self, in_use: set[int]) -> list[Any]:
        """Retired hosts that no snapshot in `in_use` (ids) references: the caller closes them."""
        unused = [h for h in self._retired if id(h) not in in_use]
        self._retired = [h for h in self._retired if id(h) in in_use]
        return unused

    async def _load(self, plugin: PluginResource) -> Any:
        data = await self.binaries.fetch(plugin)
        wasm = _wasm()
        spec = wasm.PluginSpec(
            name=plugin.name,
            wasm=data,
            configuration=plugin.configuration,
            root_id=plugin.root_id,
            vm_id=plugin.vm_id,
            vm_configuration=plugin.vm_configuration,
            fail_open=plugin.fail_open,
        )
        started = time.perf_counter()
        try:
            host = await wasm.PluginHost.create(spec, self.services())
        except wasm.PluginLoadError as exc:
            raise UnsupportedConfig(
                f"plugin '{plugin.name}' (sha256 {plugin.sha256[:12]}...): {exc}"
            ) from exc
        log.info("plugin '%s' (sha256 %s...) started in %.1f ms, its module %s",
                 plugin.name, plugin.sha256[:12], (time.perf_counter() - started) * 1000,
                 "from the module cache" if host.module_from_cache else "compiled")
        return host

    def loaded(self, view: Any) -> dict[str, Any]:
        from meshgate.gateway.resources import ECDS_TYPE

        return {
            name: self._hosts[plugin]
            for name, plugin in view.of(ECDS_TYPE).items()
            if plugin in self._hosts
        }

    async def close(self) -> None:
        """Close every plugin host (ticks, pending calls, the root's on_done), then the
        shared services (the epoch clock)."""
        hosts, self._retired = [*self._hosts.values(), *self._retired], []
        self._hosts.clear()
        for host in hosts:
            await _close_host(host)
        if self._services is not None:
            self._services.close()


async def _close_host(host: Any) -> None:
    try:
        await host.close()
    except Exception:  # a plugin failing in on_done must not stop the others closing
        log.exception("closing plugin '%s' failed", host.spec.name)


async def close_hosts(hosts: list[Any]) -> None:
    for host in hosts:
        await _close_host(host)
