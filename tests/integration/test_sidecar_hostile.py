"""Malformed and hostile HTTP against the sidecar: clear status codes, no crash, no leak."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.integration.test_sidecar_helpers import (
    mesh_config,
    running_sidecar,
    start_stack,
    upstreams,
)
from tests.support.ports import free_port


async def raw_exchange(port: int, payload: bytes, *, then_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    if then_close:
        writer.close()
        return b""
    try:
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_hostile_requests_get_clear_answers_and_the_sidecar_survives(
    tmp_path: Path,
) -> None:
    async with upstreams("a") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with running_sidecar(stack, body_idle_timeout_s=0.5) as sidecar:
                huge_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
                assert status_of(await raw_exchange(port, huge_header)) in (400, 431)

                bad_chunked = (
                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"zz\r\nhello\r\n0\r\n\r\n"
                )
                assert status_of(await raw_exchange(port, bad_chunked)) == 400

                slow_body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
                answer = await raw_exchange(port, slow_body)
                assert status_of(answer) == 408
                assert b"downstream_body_timeout" in answer

                # A client that goes away mid-body: nothing to answer, nothing left behind.
                gone = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10
                for _ in range(20):
                    await raw_exchange(port, gone, then_close=True)
                await asyncio.sleep(1.0)
                assert sidecar.holder.current.inflight == 0  # type: ignore[union-attr]

                async with aiohttp.ClientSession() as client:
                    async with client.get(f"http://127.0.0.1:{port}/alive") as resp:
                        assert resp.status == 200
        finally:
            stack.__exit__(None, None, None)


async def test_graceful_drain_finishes_requests_in_flight(tmp_path: Path) -> None:
    async with upstreams("a") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with aiohttp.ClientSession() as client:
                async with running_sidecar(stack) as sidecar:
                    slow = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/?delay=1"))
                    await asyncio.sleep(0.3)
                    stopping = asyncio.create_task(sidecar.stop())
                    await asyncio.sleep(0.1)
                    assert not sidecar.ready  # /readyz flips first
                    resp = await slow
                    assert resp.status == 200
                    assert (await resp.json())["upstream"] == "a"
                    await stopping
        finally:
            stack.__exit__(None, None, None)
