"""Plugins through the sidecar: delivered by ECDS, fetched by sha256, run by the wasm host."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_sidecar_helpers import (
    mesh_config,
    plugin_path,
    running_sidecar,
    start_stack,
    upstreams,
    wait_until,
)
from tests.support.ports import free_port

RATE_LIMIT = plugin_path("rate_limit.wasm")
needs_plugins = pytest.mark.skipif(RATE_LIMIT is None, reason="plugins not built (make setup)")


def limited(port: int, upstream: int, tokens: int) -> dict:  # type: ignore[type-arg]
    config = {"rules": [{"name": "all", "rate": {"tokens": tokens, "per_seconds": 60}}]}
    return mesh_config(
        port,
        [upstream],
        plugins=[{"name": "rate-limit", "wasm": str(RATE_LIMIT), "config": config}],
        listener_plugins=["rate-limit"],
    )


@needs_plugins
async def test_rate_limit_plugin_answers_429_after_its_tokens(tmp_path: Path) -> None:
    async with upstreams("a") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, limited(port, ports["a"], 3))
        try:
            async with running_sidecar(stack), aiohttp.ClientSession() as client:
                statuses = []
                for _ in range(5):
                    async with client.post(f"http://127.0.0.1:{port}/x", data=b"body") as resp:
                        statuses.append(resp.status)
                assert statuses == [200, 200, 200, 429, 429]
        finally:
            stack.__exit__(None, None, None)


@needs_plugins
async def test_plugin_that_fails_to_load_is_nacked_and_old_plugin_keeps_serving(
    tmp_path: Path,
) -> None:
    async with upstreams("a") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, limited(port, ports["a"], 1))
        try:
            async with running_sidecar(stack) as sidecar, aiohttp.ClientSession() as client:
                broken = tmp_path / "broken.wasm"
                broken.write_bytes(b"\0asm\x01\0\0\0garbage")
                bad = limited(port, ports["a"], 1)
                bad["plugins"][0]["wasm"] = str(broken)
                await asyncio.to_thread(stack.update, bad, wait=False)
                state = lambda: sidecar.xds.status()["types"]["TypedExtensionConfig"]  # noqa: E731
                await wait_until(lambda: state()["last_nack"], 20, "a NACK")
                assert "plugin 'rate-limit'" in state()["last_nack"]
                codes = []
                for _ in range(2):
                    async with client.get(f"http://127.0.0.1:{port}/x") as resp:
                        codes.append(resp.status)
                assert codes == [200, 429]  # the old plugin still limits
        finally:
            stack.__exit__(None, None, None)
