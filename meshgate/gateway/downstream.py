"""The sidecar's listening side: aiohttp's low-level server with a request-header timer.

aiohttp bounds a connection that never sends a request (its keep-alive timer runs from
the connection's start) and meshgate bounds slow bodies, but nothing bounds a client
that sends its header lines very slowly. Envoy's `request_headers_timeout` does: from a
request's first byte to the end of its headers, then 408 and the connection closed. The
handler below adds that timer; the timeout is read per request from the listener's
current config, so an update applies without rebinding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

HeadersTimeout = Callable[[], float | None]

# Envoy's reply, body included ("request header timeout"), plus the sidecar's cause header.
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 22\r\n"
              b"content-type: text/plain\r\nconnection: close\r\n"
              b"x-meshgate-error: downstream_headers_timeout\r\n\r\nrequest header timeout")


class _HeaderTimedHandler(RequestHandler):
    """A `RequestHandler` whose request heads must arrive within a time limit.

    The timer starts with the first bytes of a request head (data arriving while no
    request is parsed or being handled) and stops once the parser has a whole head; body
    bytes never start it (the data path times out stalled bodies itself).
    """

    __slots__ = ("_head_timer", "_headers_timeout")

    def __init__(self, manager: web.Server, *, headers_timeout: HeadersTimeout,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._headers_timeout = headers_timeout

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._messages and not self._request_in_progress:
            timeout = self._headers_timeout()
            if timeout:
                self._head_timer = self._loop.call_later(timeout, self._head_timed_out)
        super().data_received(data)
        if self._head_timer is not None and (self._messages or self._request_in_progress):
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if self._messages or self._request_in_progress or transport is None:
            return
        transport.write(_TIMED_OUT)
        self.force_close()
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class HeaderTimedServer(web.Server):
    """`web.Server` whose connections time out slow request heads (`headers_timeout()`
    seconds, or never when it answers None)."""

    def __init__(self, handler: Any, *, headers_timeout: HeadersTimeout, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._headers_timeout = headers_timeout

    def __call__(self) -> RequestHandler:
        return _HeaderTimedHandler(self, loop=self._loop, headers_timeout=self._headers_timeout,
                                   **self._kwargs)
