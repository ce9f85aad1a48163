"""The admin port: health, readiness, Prometheus metrics, and what config is applied.

Bound to 127.0.0.1 by default, like Envoy's admin: `/config_dump` shows the whole config
and is not meant for the network.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from aiohttp import web

from meshgate.gateway.metrics import SidecarMetrics


class AdminView(Protocol):
    """What the admin endpoints read from the running sidecar."""

    @property
    def ready(self) -> bool: ...

    def config_dump(self) -> dict[str, Any]: ...


def admin_app(view: AdminView, metrics: SidecarMetrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if view.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: no config applied, or draining\n")

    async def metrics_page(request: web.Request) -> web.Response:
        body, content_type = metrics.render(request.headers.get("Accept", ""))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def config_dump(_: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(view.config_dump(), indent=2, default=str) + "\n",
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/config_dump", config_dump)
    return app
