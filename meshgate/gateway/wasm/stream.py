"""``HttpStream``: one request through one plugin, driven by the data path.

Call order matches Envoy 1.40 (reference §4): ``on_context_create(N, 1)`` before the first
callback, request headers/body/trailers, response headers/body/trailers, and on
``finish()``: ``on_log``, ``on_done``, ``on_delete``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._rawcall import COMPILED_DRIVER, WasmTrap
from .abi import Action
from .actions import (
    CONTINUE,
    STOP_AND_BUFFER,
    LocalReply,
    ResetStream,
    StreamAction,
)
from .context import ROOT_CONTEXT_ID, Buffer, StreamContext, StreamInfo
from .headers import HeaderMap, LiveHeaderMap

if TYPE_CHECKING:
    from .host import PluginHost

_FAIL_CLOSED_DETAILS = "wasm_fail_stream"
_FINISH_EXPORTS = ("proxy_on_log", "proxy_on_done", "proxy_on_delete")
_PAUSE_TIMEOUT_DETAILS = "wasm_pause_timeout"


def _mutable(body: bytearray | bytes) -> bytearray:
    return body if isinstance(body, bytearray) else bytearray(body)


class HttpStream:
    """The plugin's view of one HTTP stream.

    Each method returns when the plugin has decided. A callback that pauses (returns
    PAUSE from headers/trailers, or from a body callback at end of stream) suspends the
    caller until the plugin calls ``continue_stream`` or ``send_local_response`` — usually
    from ``on_http_call_response`` — or ``services.pause_timeout_s`` passes.
    """

    __slots__ = ("host", "ctx", "_generation", "_created", "_skip", "_replied", "_finished")

    def __init__(self, host: PluginHost, ctx: StreamContext, generation: int) -> None:
        self.host = host
        self.ctx = ctx
        self._generation = generation
        self._created = False
        self._skip = False  # fail-open after a trap: the plugin is out of this stream
        self._replied = False  # a local reply ran; later callbacks are no-ops
        self._finished = False

    @property
    def context_id(self) -> int:
        return self.ctx.id

    def exports(self, callback: str) -> bool:
        """Whether the plugin exports ``callback`` (e.g. ``proxy_on_request_body``): the
        data path may rely on a body no plugin can see staying unchanged."""
        vm = self.host.vm
        return vm is not None and vm.has(callback)

    # -- request ------------------------------------------------------------------------
    async def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> StreamAction:
        """The plugin may edit ``headers`` in place."""
        action = self.begin_request_headers(headers, end_of_stream)
        return action if action is not None else await self.resumed()

    def begin_request_headers(self, headers: HeaderMap,
                              end_of_stream: bool) -> StreamAction | None:
        """``request_headers`` without a coroutine: the action, or None if the plugin
        paused the stream (then ``await resumed()``). The data path's common case is a
        plugin that decides at once, and two coroutines per plugin and phase showed in
        its profile."""
        return _one_phase(self, REQUEST_HEADERS, headers, end_of_stream, None)

    async def request_body(self, body: bytearray | bytes,
                           end_of_stream: bool) -> StreamAction:
        """``body`` is everything buffered so far. The plugin edits a ``bytearray`` in
        place; pass one to see its edits (``bytes`` are copied and edits are lost)."""
        self.ctx.request_body = Buffer(_mutable(body), mutable=True)
        self.ctx.request_body_bytes = len(body)
        return await self._run("proxy_on_request_body", len(body), end_of_stream,
                               is_body=True)

    async def request_trailers(self, trailers: HeaderMap) -> StreamAction:
        self.ctx.request_trailers = trailers
        return await self._run("proxy_on_request_trailers", len(trailers), None,
                               is_body=False)

    # -- response -----------------------------------------------------------------------
    async def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> StreamAction:
        action = self.begin_response_headers(headers, end_of_stream)
        return action if action is not None else await self.resumed()

    def begin_response_headers(self, headers: HeaderMap,
                               end_of_stream: bool) -> StreamAction | None:
        """As ``begin_request_headers``, for the response."""
        status = headers.get(":status")
        code = int(status) if status and status.isdigit() else None
        return _one_phase(self, RESPONSE_HEADERS, headers, end_of_stream, code)

    async def response_body(self, body: bytearray | bytes,
                            end_of_stream: bool) -> StreamAction:
        """As ``request_body``, for the response."""
        action = self.begin_response_body(body, end_of_stream)
        return action if action is not None else await self.resumed()

    def begin_response_body(self, body: bytearray | bytes,
                            end_of_stream: bool) -> StreamAction | None:
        """As ``begin_request_headers``, for a response body (``response_body``)."""
        return _one_phase(self, RESPONSE_BODY, Buffer(_mutable(body), mutable=True),
                          end_of_stream, None)

    async def response_trailers(self, trailers: HeaderMap) -> StreamAction:
        self.ctx.response_trailers = trailers
        return await self._run("proxy_on_response_trailers", len(trailers), None,
                               is_body=False)

    # -- end ----------------------------------------------------------------------------
    def finish(self) -> None:
        """``on_log``, ``on_done``, ``on_delete`` (Envoy 1.40's observed order).

        Synchronous: nothing here waits, so the data path can call it from a ``finally``.
        """
        if self._finished:
            return
        self._finished = True
        self.host.streams.pop(self.ctx.id, None)
        if not self._created or not self._alive():
            return
        try:
            _invoke_all(self.host, self.ctx, _FINISH_EXPORTS, (self.ctx.id,))
        except WasmTrap as exc:
            self.host.trapped(exc.callback, exc)  # type: ignore[attr-defined]

    # -- machinery ----------------------------------------------------------------------
    def _alive(self) -> bool:
        host = self.host
        return self._generation == host.generation and not host.vm.broken

    def _failure(self) -> StreamAction:
        """The plugin's failure policy for this stream (Envoy: 503, empty body)."""
        if self.host.spec.fail_open:
            self._skip = True
            return CONTINUE
        self._replied = True
        return LocalReply(503, [], b"", _FAIL_CLOSED_DETAILS)

    async def _run(self, export: str, size: int, end_of_stream: bool | None,
                   is_body: bool) -> StreamAction:
        action = _drive(self, export, size, end_of_stream, is_body)
        return action if action is not None else await self.resumed()

    def _call(self, export: str, size: int, end_of_stream: bool | None,
              is_body: bool) -> StreamAction | None:
        """Run one callback: its action, or None when the plugin paused the stream.

        The reference for the compiled driver (``_driver.h``), which runs instead in the
        common case and calls this for anything else. Runs for every callback of every
        request: the helpers (``_alive``, ``_settled``) are tested inline first and
        called only when they have something to say."""
        if self._skip or self._replied or self._finished:
            return CONTINUE
        host, ctx = self.host, self.ctx
        if self._generation != host.generation or host.vm.broken:
            if self._created or self._generation < 0 or not self._reopen():
                return self._failure()
        args = (ctx.id, size) if end_of_stream is None else (ctx.id, size, int(end_of_stream))
        try:
            if self._created:
                action = host._invoke(ctx, export, *args)
            else:
                self._created = True
                action = host._invoke_each(
                    ctx, (("proxy_on_context_create", (ctx.id, ROOT_CONTEXT_ID)), (export, args)))
        except WasmTrap as exc:
            # The log names the callback that trapped (context creation or this one).
            return self._after_trap(getattr(exc, "callback", export), exc)
        if ctx.failed or ctx.reset_requested or ctx.local_reply is not None:
            return self._settled()
        if not action or action == Action.CONTINUE:
            return CONTINUE
        if ctx.continued:
            ctx.continued = False
            return CONTINUE
        if is_body and not end_of_stream:
            return STOP_AND_BUFFER
        return None

    def _reopen(self) -> bool:
        """A stream opened on a VM that has trapped since, before any callback of its own
        ran, takes a context on the host's live VM, as a stream opened now would: the
        data path opens a request's streams a loop pass before its request-headers
        callbacks run when it batches them (decision 3100), and a trap in between, in
        another request, must not fail this one. False if no VM can be started."""
        if not self.host.move_to_live_vm(self.ctx):
            return False
        self._generation = self.host.generation
        return True

    def _after_trap(self, callback: str, exc: WasmTrap) -> StreamAction:
        self.host.trapped(callback, exc)
        return self._failure()

    def _settled(self) -> StreamAction | None:
        """A local reply, reset or failure the plugin caused during (or while paused)."""
        ctx = self.ctx
        if ctx.failed:
            return self._failure()
        if ctx.reset_requested:
            self._replied = True
            return ResetStream()
        if ctx.local_reply is not None:
            return self._run_local_reply()
        return None

    async def resumed(self) -> StreamAction:
        """After a ``begin_*`` answered None: wait until the plugin resumes the stream,
        replies, or ``pause_timeout_s`` passes (504)."""
        return await self._wait_for_resume()

    async def _wait_for_resume(self) -> StreamAction:
        ctx = self.ctx
        ctx.resume = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(ctx.resume, self.host.services.pause_timeout_s)
        except TimeoutError:
            self._replied = True
            return LocalReply(504, [], b"", _PAUSE_TIMEOUT_DETAILS)
        finally:
            ctx.resume = None
        ctx.continued = False
        settled = self._settled()
        if settled is not None:
            return settled
        if not self._alive():
            return self._failure()
        return CONTINUE

    def _run_local_reply(self) -> StreamAction:
        """Envoy runs the same plugin's response callbacks over its local reply (§4)."""
        reply = self.ctx.local_reply
        assert reply is not None
        self._replied = True
        ctx, host = self.ctx, self.host
        headers = HeaderMap([(":status", str(reply.status)), *reply.headers])
        if reply.body and "content-type" not in headers:
            headers.add("content-type", "text/plain")
        body = bytearray(reply.body)
        ctx.response_headers = headers
        ctx.response_code = reply.status
        ctx.response_code_details = reply.details
        ctx.response_body = Buffer(body, mutable=True)
        try:
            host._invoke(ctx, "proxy_on_response_headers", ctx.id, len(headers), int(not body))
            if body:
                host._invoke(ctx, "proxy_on_response_body", ctx.id, len(body), 1)
        except WasmTrap as exc:
            host.trapped("proxy_on_response_headers", exc)
            return LocalReply(503, [], b"", _FAIL_CLOSED_DETAILS)
        status = headers.get(":status")
        regular = [(k, v) for k, v in headers if not k.startswith(":") and k != "content-length"]
        return LocalReply(int(status) if status and status.isdigit() else reply.status,
                          regular, bytes(ctx.response_body.data), reply.details)


def finish_streams_py(streams: list[HttpStream]) -> list[Exception] | None:
    """``finish()`` every stream; the errors (none: None), each stream finished anyway."""
    errors: list[Exception] | None = None
    for stream in streams:
        try:
            stream.finish()
        except Exception as exc:
            errors = errors or []
            errors.append(exc)
    return errors


def finish_across_py(stream_lists: list[list[HttpStream]]) -> list[Exception] | None:
    """``finish_streams`` over several requests' streams, plugin by plugin: the first
    stream of every list, then the second of every list, and so on. The closing batch's
    order, so that each plugin's closing code runs warm after its first request."""
    width = max(map(len, stream_lists), default=0)
    return finish_streams_py([streams[i] for i in range(width) for streams in stream_lists
                              if i < len(streams)])


#: ``_drive(stream, export, size, end_of_stream, is_body)``: ``HttpStream._call``, or the
#: compiled driver where the compiled crossings are in use (decision 1100).
if COMPILED_DRIVER is not None:
    COMPILED_DRIVER.configure_driver(CONTINUE, STOP_AND_BUFFER, WasmTrap, _FINISH_EXPORTS,
                                     finish_streams_py)
_drive = COMPILED_DRIVER.drive if COMPILED_DRIVER is not None else HttpStream._call


def _invoke_all_py(host: PluginHost, ctx: StreamContext, exports: tuple[str, ...],
                   args: tuple[int, ...]) -> int | None:
    # A function, not ``PluginHost._invoke_all`` itself: host.py imports this module.
    return host._invoke_all(ctx, exports, args)


_invoke_all = (COMPILED_DRIVER.invoke_all if COMPILED_DRIVER is not None
               else _invoke_all_py)

#: The phases ``drive_phase`` runs (the compiled driver's numbering).
REQUEST_HEADERS, RESPONSE_HEADERS, RESPONSE_BODY = 0, 1, 2


def drive_phase_py(streams: list[HttpStream], start: int, phase: int,
                   payload: HeaderMap | LiveHeaderMap | Buffer, end_of_stream: bool,
                   code: int | None) -> tuple[int, StreamAction | None] | None:
    """One phase of a request through ``streams[start:]``, in that order, as the data
    path drives it: each stream's context shows ``payload`` (the headers, or the response
    body's buffer, shared so that each plugin sees the edits of the ones before) and its
    callback runs. None when every stream continued; else ``(index, action)`` of the
    first that did not (action None: it paused, ``await streams[index].resumed()``).

    ``code`` is the response's status for ``response_code``, the same for every plugin.
    One C call per phase where the compiled driver runs (decision 1400): the Python
    frames per stream and phase were a tenth of the plugins' share of a request.
    """
    for i in range(start, len(streams)):
        stream = streams[i]
        ctx = stream.ctx
        if phase == RESPONSE_BODY:
            assert isinstance(payload, Buffer)
            ctx.response_body = payload
            action = _drive(stream, "proxy_on_response_body", len(payload.data),
                            end_of_stream, True)
        else:
            assert isinstance(payload, (HeaderMap, LiveHeaderMap))
            if phase == REQUEST_HEADERS:
                ctx.request_headers = payload
                export = "proxy_on_request_headers"
            else:
                ctx.response_headers = payload
                ctx.response_code = code
                ctx.response_code_details = "via_upstream"
                export = "proxy_on_response_headers"
            action = _drive(stream, export, len(payload), end_of_stream, False)
        if action is not CONTINUE:
            return i, action
    return None


drive_phase = COMPILED_DRIVER.drive_phase if COMPILED_DRIVER is not None else drive_phase_py


def _one_phase(stream: HttpStream, phase: int, payload: HeaderMap | Buffer,
               end_of_stream: bool, code: int | None) -> StreamAction | None:
    """A phase through one stream (its ``begin_*`` methods): its action, None if paused."""
    stopped = drive_phase([stream], 0, phase, payload, end_of_stream, code)
    return CONTINUE if stopped is None else stopped[1]


finish_streams = (COMPILED_DRIVER.finish_streams if COMPILED_DRIVER is not None
                  else finish_streams_py)
finish_across = (COMPILED_DRIVER.finish_across if COMPILED_DRIVER is not None
                 else finish_across_py)


def open_streams_py(hosts: Sequence[PluginHost], info: StreamInfo) -> list[HttpStream]:
    """A request's streams, one per host, in order, sharing ``info``."""
    return [host.new_stream(info) for host in hosts]


def _templates() -> tuple[StreamContext, HttpStream]:
    """What the compiled ``open_streams`` copies (``_streams.h``): a context and a stream
    as their ``__init__`` leaves them. The copy's id, info, root, host, context and
    generation are set after; the rest are the defaults."""
    ctx = StreamContext(0, StreamInfo(), None)  # type: ignore[arg-type]
    return ctx, HttpStream(None, ctx, 0)  # type: ignore[arg-type]


#: ``open_streams(hosts, info)``: ``open_streams_py``, compiled where the compiled driver
#: is in use (decision 1700).
if COMPILED_DRIVER is not None:
    COMPILED_DRIVER.configure_streams(*_templates())
open_streams = (COMPILED_DRIVER.open_streams if COMPILED_DRIVER is not None
                else open_streams_py)
