"""Plugin binaries come over HTTP and must have the sha256 the control server pinned."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from meshgate.gateway.plugin_resources import PluginBinaryCache, PluginResource
from meshgate.gateway.resources import UnsupportedConfig

WASM = b"\0asm\1\0\0\0"


@pytest.fixture
async def plugin_server() -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.Response:
        if request.match_info["name"] == "missing":
            return web.Response(status=404)
        return web.Response(body=WASM)

    app = web.Application()
    app.router.add_get("/plugins/{name}.wasm", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/plugins"
    await runner.cleanup()


def resource(url: str, sha256: str) -> PluginResource:
    return PluginResource("meshgate.plugin.auth", "auth", "", "", url, sha256, b"", b"", False)


async def test_binary_with_the_pinned_sha256_is_accepted(plugin_server: str) -> None:
    sha = hashlib.sha256(WASM).hexdigest()
    assert await PluginBinaryCache().fetch(resource(f"{plugin_server}/{sha}.wasm", sha)) == WASM


async def test_binary_with_another_sha256_is_refused_naming_both(plugin_server: str) -> None:
    wrong = "0" * 64
    with pytest.raises(UnsupportedConfig) as err:
        await PluginBinaryCache().fetch(resource(f"{plugin_server}/{wrong}.wasm", wrong))
    message = str(err.value)
    assert "sha256 mismatch" in message and wrong in message
    assert hashlib.sha256(WASM).hexdigest() in message and "plugin 'auth'" in message


async def test_unreachable_or_missing_binary_is_refused(plugin_server: str) -> None:
    with pytest.raises(UnsupportedConfig, match="HTTP 404"):
        await PluginBinaryCache().fetch(resource(f"{plugin_server}/missing.wasm", "1" * 64))
    with pytest.raises(UnsupportedConfig, match="fetch failed"):
        await PluginBinaryCache().fetch(resource("http://127.0.0.1:1/x.wasm", "1" * 64))
