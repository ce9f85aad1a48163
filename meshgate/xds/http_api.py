"""The control server's HTTP port: plugin binaries by sha256, status, health."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

PLUGIN_CONTENT_TYPE = "application/wasm"


class PluginStore:
    """Every plugin binary this process has served, by sha256.

    Binaries of older configs stay available so a proxy still warming an older ECDS
    resource (or a sidecar retrying) can fetch them after a config change.
    """

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    def add(self, sha256: str, wasm: bytes) -> None:
        self._blobs[sha256] = wasm

    def get(self, sha256: str) -> bytes | None:
        return self._blobs.get(sha256)


def build_app(plugins: PluginStore, status: Callable[[], dict[str, Any]]) -> web.Application:
    async def plugin(request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        sha256 = name.removesuffix(".wasm")
        blob = plugins.get(sha256) if name.endswith(".wasm") else None
        if blob is None:
            raise web.HTTPNotFound(text=f"no plugin binary with sha256 {sha256}\n")
        return web.Response(body=blob, content_type=PLUGIN_CONTENT_TYPE,
                            headers={"cache-control": "public, max-age=31536000, immutable"})

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response({"generated_at": time.time(), **status()})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/plugins/{file}", plugin)
    app.router.add_get("/status", status_json)
    app.router.add_get("/healthz", healthz)
    return app
