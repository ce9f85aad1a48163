"""Echo upstreams served from a background thread, so blocking tests can use them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from meshgate.demo import echo_app
from tests.support.ports import free_port


@contextmanager
def echo_upstreams(*names: str) -> Iterator[dict[str, int]]:
    """Start one echo server per name; yields name -> port."""
    loop = asyncio.new_event_loop()
    ports = {name: free_port() for name in names}
    runners: list[web.AppRunner] = []

    async def start() -> None:
        for name, port in ports.items():
            runner = web.AppRunner(echo_app(name), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield ports
    finally:
        async def stop() -> None:
            for runner in runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
