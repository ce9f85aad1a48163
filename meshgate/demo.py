"""The demo upstream that `meshgate up` starts: echoes what it received as JSON."""

from __future__ import annotations

from aiohttp import web


def echo_app(name: str = "demo") -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "upstream": name,
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body_bytes": len(body),
            },
            headers={"x-upstream": name},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
