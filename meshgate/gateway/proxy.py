"""The data path: one aiohttp handler per listener, proxying HTTP/1.1 to clusters.

Bodies stream both ways; they are buffered only when a plugin asks for them, up to
`DataPathSettings.max_buffered_body` (413 beyond it). Errors the sidecar generates say
why in the `x-meshgate-error` header and in the log, with Envoy's status codes: 404 no
route, 503 no cluster / no healthy endpoint / connect failure, 504 upstream timeout,
502 upstream reset or malformed response, 408 a client too slow to send its body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from meshgate.gateway.config import ConfigHolder, ListenerConfig, SidecarConfig
from meshgate.gateway.filters import (
    BodyTooLarge,
    FinishBatch,
    LocalReply,
    PluginChain,
    PluginReplied,
    QueuedPhase,
    RequestBatch,
    StreamReset,
    next_chunk,
)
from meshgate.gateway.metrics import SidecarMetrics
from meshgate.gateway.resources import Endpoint, Route
from meshgate.gateway.tracing import (
    id_generator,
    inject_w3c,
    light_server_span,
    sidecar_tracer_provider,
    spans_consumed,
    w3c_context,
)
from meshgate.gateway.upstream import NoHealthyUpstream, UpstreamCluster

log = logging.getLogger("meshgate.sidecar.proxy")
ERROR_HEADER = "x-meshgate-error"
_PROPAGATOR = TraceContextTextMapPropagator()
# RFC 9110 §7.6.1 connection-specific fields, plus the ones HTTP/1.1 proxies drop.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "proxy-authenticate",
     "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade")
)  # fmt: skip
SMALL_BODY = 64 * 1024  # responses up to this size are read whole and sent in one write


@dataclass(frozen=True)
class DataPathSettings:
    max_buffered_body: int = 1024 * 1024
    body_idle_timeout_s: float = 30.0


class ProxyError(Exception):
    """A response the sidecar makes itself; `cause` goes to the header and the log."""

    def __init__(self, status: int, cause: str, detail: str = "") -> None:
        super().__init__(f"{status} {cause}: {detail}")
        self.status, self.cause, self.detail = status, cause, detail


def request_id() -> str:
    """A random UUID version 4 as 32 hex digits, as ``uuid.uuid4().hex`` gives, at a
    fifth of its cost (it runs once per request)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()


def strip_hop_by_hop(headers: CIMultiDict[str] | aiohttp.typedefs.LooseHeaders) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(headers)
    for name in out.getall("connection", ()):
        for token in name.split(","):
            out.popall(token.strip(), None)
    for name in HOP_BY_HOP:
        out.popall(name, None)
    return out


class DataPath:
    """Owns nothing long-lived; reads the current config snapshot per request."""

    def __init__(
        self,
        holder: ConfigHolder,
        metrics: SidecarMetrics,
        settings: DataPathSettings | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.settings = settings or DataPathSettings()
        self.provider = tracer_provider or sidecar_tracer_provider()
        self.tracer = self.provider.get_tracer("meshgate.sidecar")
        self._ids = id_generator(self.provider)
        self.request_phases = RequestBatch(metrics.plugin_request_batches)
        self.finishing = FinishBatch(holder, metrics.plugin_finish_batches)

    def handler(self, listener: str) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await self.handle(listener, request)

        return handle

    async def handle(self, listener_name: str, request: web.BaseRequest) -> web.StreamResponse:
        config = self.holder.current
        lc = config.listeners.get(listener_name) if config else None
        if config is None or lc is None:
            return _error_response(ProxyError(503, "listener_not_configured", listener_name))
        config.inflight += 1
        started = time.perf_counter()
        token = None
        span: trace.Span
        if spans_consumed(self.provider):
            parent = _PROPAGATOR.extract(request.headers)
            span = self.tracer.start_span(
                f"{request.method} {listener_name}", context=parent, kind=SpanKind.SERVER
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        else:  # nobody sees spans: the trace context alone, for propagation and exemplars
            span = light_server_span(request.headers, self._ids)
        w3c = w3c_context(span)
        cluster_name, response = "", None
        try:
            cluster_name, response = await self._proxy(config, lc, request, span, w3c)
            return response
        finally:
            self.holder.release(config)
            status = response.status if response is not None else 499
            if token is not None:
                otel_context.detach(token)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            self.metrics.observe_request(
                listener_name, cluster_name, status, time.perf_counter() - started,
                w3c[0][3:35] if w3c else None,  # the trace id, for the exemplar
            )

    async def _proxy(
        self, config: SidecarConfig, lc: ListenerConfig, request: web.BaseRequest,
        span: trace.Span, w3c: tuple[str, str] | None,
    ) -> tuple[str, web.StreamResponse]:
        headers = request.headers
        route = lc.routes.select(request.host, request.raw_path, headers)  # type: ignore[arg-type]
        if route is None:
            return "", _error_response(ProxyError(404, "no_route", request.raw_path))
        span.set_attribute("meshgate.route", route.name)
        cluster = config.clusters.get(route.cluster)
        if cluster is None:
            return route.cluster, _error_response(
                ProxyError(503, "cluster_not_found", route.cluster)
            )
        up_headers = self._upstream_headers(request, w3c)
        chain = None
        if lc.plugins:
            limit = self.settings.max_buffered_body
            chain = PluginChain.start(lc.plugins, request, span, limit, w3c, route.name,
                                      route.cluster)
        timeout_s = lc.spec.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
        try:
            return route.cluster, await self._exchange(
                request, route, cluster, up_headers, chain, deadline
            )
        except ProxyError as exc:
            log.warning("%s %s → %s", request.method, request.raw_path, exc)
            if chain is None or chain.responded:  # the plugins saw a response already
                return route.cluster, _error_response(exc)
            return route.cluster, await _error_through_plugins(chain, exc, request)
        except PluginReplied as replied:
            return route.cluster, _local_reply(replied.reply)
        except StreamReset:
            return route.cluster, _reset(request)
        finally:
            if chain is not None:
                # The closing callbacks run after the response is out, with the other
                # requests' of this loop pass; the snapshot stays held until then.
                self.finishing.add(chain, config)

    def _upstream_headers(
        self, request: web.BaseRequest, w3c: tuple[str, str] | None
    ) -> CIMultiDict[str]:
        out = strip_hop_by_hop(request.headers)
        peer = request.remote or ""
        prior = out.get("x-forwarded-for")
        out["x-forwarded-for"] = f"{prior}, {peer}" if prior else peer
        if "x-forwarded-proto" not in out:
            out["x-forwarded-proto"] = request.scheme
        if "x-request-id" not in out:
            out["x-request-id"] = request_id()
        inject_w3c(w3c, out)  # the request's span, attached to no context
        return out

    async def _exchange(
        self,
        request: web.BaseRequest,
        route: Route,
        cluster: UpstreamCluster,
        up_headers: CIMultiDict[str],
        chain: PluginChain | None,
        deadline: float | None = None,
    ) -> web.StreamResponse:
        """`deadline` (loop time): the listener's `request_timeout`, as Envoy's: the whole
        request (the plugins' request phase, then the body) must be in by then."""
        path = route.rewrite(request.raw_path)
        if chain is not None:
            rest = self.request_phases.begin_request_headers(
                chain, request.method, path, up_headers, request)
            if rest.__class__ is QueuedPhase:  # batched with this pass's other requests
                rest = await rest  # type: ignore[misc]
            if rest is not None:
                await _paused_plugins(rest, deadline, request)
            path = chain.path or path
        body: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            body = _body_stream(request, self.settings.body_idle_timeout_s, deadline)
            if chain is not None:
                body = await _framed_through_plugins(chain, body, up_headers)
        upstream = await self._send(request.method, path, route, cluster, up_headers, body)
        try:
            return await self._respond(request, upstream, chain)
        finally:
            upstream.release()

    async def _send(
        self,
        method: str,
        path: str,
        route: Route,
        cluster: UpstreamCluster,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        endpoint = _pick(cluster)
        timeout_s = route.timeout_s
        timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=cluster.spec.connect_timeout_s
        )
        url = URL(f"http://{endpoint.host}:{endpoint.port}{path}", encoded=True)
        cluster.started(endpoint)
        try:
            return await cluster.session.request(
                method, url, headers=headers, data=body, timeout=timeout,
                allow_redirects=False, compress=None, auto_decompress=False,
            )  # fmt: skip
        except BodyStreamError as exc:
            raise ProxyError(exc.status, exc.cause, str(exc)) from exc
        except (PluginReplied, StreamReset):
            raise
        except BodyTooLarge as exc:
            raise ProxyError(413, "request_body_too_large", str(exc)) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise ProxyError(503, "upstream_connect_timeout", f"{endpoint}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise ProxyError(
                503, "upstream_connect_failure", f"{endpoint}: {exc.os_error}"
            ) from exc
        except TimeoutError as exc:
            raise ProxyError(504, "upstream_timeout", f"{endpoint} after {timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            cause = _body_cause(exc)
            if cause is not None:
                raise ProxyError(*cause, str(exc)) from exc
            # Envoy's status for an upstream gone before its response headers.
            raise ProxyError(503, "upstream_reset", f"{endpoint}: {exc!r}") from exc
        finally:
            cluster.finished(endpoint)

    async def _respond(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        chain: PluginChain | None,
    ) -> web.StreamResponse:
        headers = strip_hop_by_hop(upstream.headers)
        status = upstream.status
        if chain is not None:
            rest = chain.begin_response_headers(status, headers)
            if rest is not None:
                await rest
            status = chain.status or status
        length = upstream.content_length
        if request.method == "HEAD" or status in (204, 304):
            return web.Response(status=status, headers=headers)
        if length is not None and length <= SMALL_BODY:
            body = await self._read_upstream(upstream)
            if chain is not None:
                out = chain.begin_whole_response_body(body)
                body = out if isinstance(out, bytes) else await out
            headers.popall("content-length", None)
            return web.Response(status=status, headers=headers, body=body)
        return await self._stream(request, upstream, status, headers, chain)

    async def _read_upstream(self, upstream: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.max_buffered_body
        try:
            data = await upstream.content.read(limit + 1)
            if len(data) > limit:
                raise ProxyError(502, "upstream_body_too_large", f"over {limit} bytes")
            # read(n) may return early; drain the rest within the limit.
            while not upstream.content.at_eof():
                data += await upstream.content.read(limit + 1 - len(data))
                if len(data) > limit:
                    raise ProxyError(502, "upstream_body_too_large", f"over {limit} bytes")
            return data
        except TimeoutError as exc:
            raise ProxyError(504, "upstream_timeout", "while reading the body") from exc
        except aiohttp.ClientError as exc:
            raise ProxyError(502, "upstream_body_reset",
                             f"while reading the body: {exc!r}") from exc

    async def _stream(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        status: int,
        headers: CIMultiDict[str],
        chain: PluginChain | None,
    ) -> web.StreamResponse:
        length = upstream.content_length
        headers.popall("content-length", None)
        response = web.StreamResponse(status=status, headers=headers)
        chunks: AsyncIterator[bytes] = upstream.content.iter_any()
        if chain is not None:
            chunks = chain.response_body(chunks)  # may resize: send chunked
        elif length is not None:
            response.content_length = length
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError, PluginReplied, StreamReset, BodyTooLarge) as exc:
            # Headers are out: the only honest signal left is to cut the connection.
            log.warning("upstream failed mid-body for %s: %r", request.raw_path, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


class BodyStreamError(Exception):
    def __init__(self, status: int, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.cause = status, cause


async def _body_stream(
    request: web.BaseRequest, idle_s: float, deadline: float | None = None
) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk, failing clearly on a stall, a broken body, or
    the listener's request timeout (`deadline`, loop time)."""
    content = request.content
    loop = asyncio.get_running_loop()
    while True:
        limit = loop.time() + idle_s
        whole = deadline is not None and deadline < limit
        try:
            async with asyncio.timeout_at(deadline if whole else limit):
                chunk = await content.readany()
        except TimeoutError as exc:
            if whole:
                raise BodyStreamError(408, "downstream_request_timeout",
                                      "body not in by the request timeout") from exc
            raise BodyStreamError(408, "downstream_body_timeout", f"no body for {idle_s}s") from exc
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise BodyStreamError(400, "downstream_disconnect", repr(exc)) from exc
        except Exception as exc:  # the parser's errors: bad chunked encoding, short body
            raise BodyStreamError(400, "downstream_bad_body", repr(exc)) from exc
        if not chunk:
            return
        yield chunk


async def _paused_plugins(rest: Awaitable[None], deadline: float | None,
                          request: web.BaseRequest) -> None:
    """The request phase after a plugin paused, within the request timeout. Only a pause
    can outlast it: the rest of the phase is bounded by the plugins' CPU deadline, so a
    request whose plugins decide at once needs no timer."""
    if deadline is None:
        await rest
        return
    try:
        async with asyncio.timeout_at(deadline):
            await rest
    except TimeoutError as exc:
        # Envoy's code: 504 once the client has sent the whole request (the wait is the
        # proxy's), 408 while it has not.
        received = not request.body_exists or request.content.is_eof()
        raise ProxyError(504 if received else 408, "downstream_request_timeout",
                         "plugins still deciding at the request timeout") from exc


async def _framed_through_plugins(
    chain: PluginChain, source: AsyncIterator[bytes], up_headers: CIMultiDict[str]
) -> bytes | AsyncIterator[bytes]:
    """The request body after the plugins, framed as Envoy frames it.

    Envoy forwards the `content-length` the plugins left in the headers (a plugin that
    resizes a body is expected to remove it in its headers callback, and then the body
    goes chunked). Without a length, the body streams chunked. With one:
    - no plugin exports a request-body callback: the body cannot change, it streams
      under the client's length;
    - otherwise the first chunk out of the plugins is awaited before anything leaves: if
      it is the whole body (one chunk, or a plugin buffered it all), it goes out with its
      real length, so a plugin that rewrote a buffered body cannot break the framing;
      if the body keeps streaming, it goes under the declared length, checked.
    Errors raised here (a plugin reply, a body over the buffer limit, a broken client
    body) are mapped like the ones raised while sending.
    """
    declared = up_headers.get("content-length")
    body = chain.request_body(source)
    if declared is None or not declared.isdigit():
        up_headers.popall("content-length", None)
        return body
    if not chain.may_change_request_body:
        return body
    iterator = body.__aiter__()
    try:
        first = await next_chunk(iterator)
        second = await next_chunk(iterator) if first is not None else None
    except BodyStreamError as exc:
        raise ProxyError(exc.status, exc.cause, str(exc)) from exc
    except BodyTooLarge as exc:
        raise ProxyError(413, "request_body_too_large", str(exc)) from exc
    if second is None:
        whole = first or b""
        up_headers["content-length"] = str(len(whole))
        return whole
    return _checked_length((first or b"", second), iterator, int(declared))


async def _checked_length(
    head: tuple[bytes, ...], rest: AsyncIterator[bytes], declared: int
) -> AsyncIterator[bytes]:
    """Stream under a declared length; a plugin that resized a streamed body without
    removing `content-length` fails the request instead of sending a truncated or
    overlong body (aiohttp would silently cut the excess)."""
    sent = 0
    for chunk in head:
        sent += len(chunk)
        if sent > declared:
            break
        yield chunk
    else:
        async for chunk in rest:
            sent += len(chunk)
            if sent > declared:
                break
            yield chunk
    if sent != declared:
        raise BodyStreamError(
            500, "request_body_length_mismatch",
            f"plugins changed the body to {sent}+ bytes under content-length {declared}",
        )  # fmt: skip


def _body_cause(exc: BaseException) -> tuple[int, str] | None:
    """aiohttp wraps an error raised while writing the body; find ours inside it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BodyStreamError):
            return seen.status, seen.cause
        if isinstance(seen, BodyTooLarge):
            return 413, "request_body_too_large"
        if isinstance(seen, PluginReplied | StreamReset):
            raise seen
        seen = seen.__cause__ or seen.__context__
    return None


def _pick(cluster: UpstreamCluster) -> Endpoint:
    try:
        return cluster.pick()
    except NoHealthyUpstream as exc:
        raise ProxyError(503, "no_healthy_upstream", cluster.spec.name) from exc


_BEFORE_HEADERS = "upstream connect error or disconnect/reset before headers. reset reason: "
# Envoy 1.40's bodies for the same failures, as tests/integration/test_conformance_*.py
# observe them (clients and plugins may match on them); the other replies carry the cause.
_ENVOY_BODIES = {
    "downstream_request_timeout": "request timeout",
    "upstream_connect_failure": _BEFORE_HEADERS + "remote connection failure",
    "upstream_reset": _BEFORE_HEADERS + "connection termination",
    "upstream_timeout": "upstream request timeout",
}


def _error_response(exc: ProxyError) -> web.Response:
    body = _ENVOY_BODIES.get(exc.cause)
    response = web.Response(
        status=exc.status,
        body=(body or f"{exc.cause}\n").encode(),
        content_type="text/plain",
        headers={ERROR_HEADER: exc.cause},
    )
    return _closing_if_body_unread(response, exc)


def _closing_if_body_unread(response: web.Response, exc: ProxyError) -> web.Response:
    if exc.status == 408:
        # The client's body was not read to its end: what is left of it must not be
        # taken for a next request on this connection (Envoy closes it too).
        response.force_close()
    return response


async def _error_through_plugins(
    chain: PluginChain, exc: ProxyError, request: web.BaseRequest
) -> web.Response:
    """The sidecar's own reply, through the plugins' response callbacks: Envoy passes its
    local replies (503 connect failure, 504 request timeout, ...) through the filters'
    encode path, so a plugin that adds headers to every response adds them there too."""
    plain = _error_response(exc)
    headers = CIMultiDict(plain.headers)
    headers.popall("content-length", None)
    try:
        await chain.response_headers(exc.status, headers)
        body = await chain.whole_response_body(plain.body or b"")  # type: ignore[arg-type]
    except PluginReplied as replied:
        return _local_reply(replied.reply)
    except StreamReset:
        return _reset(request)
    return _closing_if_body_unread(
        web.Response(status=chain.status or exc.status, headers=headers, body=body), exc)


def _reset(request: web.BaseRequest) -> web.Response:
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


def _local_reply(reply: LocalReply) -> web.Response:
    headers = CIMultiDict(reply.headers)
    if reply.details:
        headers.setdefault(ERROR_HEADER, reply.details)
    return web.Response(status=reply.status, headers=headers, body=reply.body)
