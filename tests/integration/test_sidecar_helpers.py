"""Shared pieces of the sidecar integration tests: upstreams, a stack, a sidecar in-process.

The control server is the real one, started as a subprocess by `tests.support.stack`; the
sidecar runs in the test's event loop, so tests can look at its state directly; the
upstreams are small aiohttp apps in the same loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from meshgate.gateway.app import Sidecar, SidecarOptions
from meshgate.gateway.collector import DEFAULT_YOUNG_THRESHOLD
from meshgate.gateway.proxy import DataPathSettings
from tests.support.ports import free_port
from tests.support.stack import Stack

SIDECAR_CLUSTER = "meshgate-sidecar"


def upstream_app(name: str) -> web.Application:
    """An upstream that says who it is, what it got, and can be slow or big on demand."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if "delay" in request.query:
            await asyncio.sleep(float(request.query["delay"]))
        if "big" in request.query:
            response = web.StreamResponse()
            await response.prepare(request)
            # `fill` lets a test stream a body with a word a plugin looks for.
            chunk = (request.query.get("fill", "x").encode() * 65536)[:65536]
            for _ in range(int(request.query["big"]) // 65536):
                await response.write(chunk)
            await response.write_eof()
            return response
        payload = {
            "upstream": name,
            "method": request.method,
            "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_length": len(body),
        }
        return web.json_response(payload, headers={"Keep-Alive": "timeout=5", "X-Upstream": name})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def upstreams(*names: str) -> AsyncIterator[dict[str, int]]:
    runners, ports = [], {}
    for name in names:
        runner = web.AppRunner(upstream_app(name), access_log=None)
        await runner.setup()
        ports[name] = free_port()
        await web.TCPSite(runner, "127.0.0.1", ports[name]).start()
        runners.append(runner)
    try:
        yield ports
    finally:
        for runner in runners:
            await runner.cleanup()


def mesh_config(
    sidecar_port: int,
    endpoints: list[int],
    *,
    routes: list[dict[str, Any]] | None = None,
    plugins: list[dict[str, Any]] | None = None,
    listener_plugins: list[str] | None = None,
) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "ingress",
        "port": sidecar_port,
        "routes": routes or [{"name": "all", "prefix": "/", "cluster": "web", "timeout": "2s"}],
    }
    if listener_plugins:
        listener["plugins"] = listener_plugins
    config: dict[str, Any] = {
        "listeners": [listener],
        "clusters": [
            {
                "name": "web",
                "endpoints": [f"127.0.0.1:{p}" for p in endpoints],
                "connect_timeout": "0.5s",
            }
        ],
        "nodes": [{"cluster": SIDECAR_CLUSTER, "listeners": ["ingress"]}],
    }
    if plugins:
        config["plugins"] = plugins
    return config


async def start_stack(tmp_path: Path, config: dict[str, Any]) -> Stack:
    stack = Stack(tmp_path, config)
    await asyncio.to_thread(stack.__enter__)
    return stack


@asynccontextmanager
async def running_sidecar(
    stack: Stack, *, delta: bool = True, node_id: str = "sidecar-0",
    gc_young_threshold: int = DEFAULT_YOUNG_THRESHOLD, module_cache_dir: Path | None = None,
    **settings: Any
) -> AsyncIterator[Sidecar]:
    options = SidecarOptions(
        xds_target=f"127.0.0.1:{stack.xds_port}",
        node_id=node_id,
        node_cluster=SIDECAR_CLUSTER,
        delta=delta,
        admin_port=0,
        drain_timeout_s=5.0,
        data_path=DataPathSettings(**settings),
        gc_young_threshold=gc_young_threshold,
        module_cache_dir=module_cache_dir,
    )
    sidecar = Sidecar(options)
    await sidecar.start()
    try:
        await asyncio.wait_for(sidecar.ready_event.wait(), 20)
        yield sidecar
    finally:
        await sidecar.stop()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def dump(sidecar: Sidecar) -> str:
    return json.dumps(sidecar.config_dump(), default=str)


def plugin_path(file_name: str) -> Path | None:
    """A built plugin: `make setup` puts them in build/plugins; a bare cargo build leaves
    them in the cargo target folder."""
    import os

    from tests.support.stack import PLUGINS

    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/meshgate/cargo-target"))
    for candidate in (PLUGINS / file_name, target / "wasm32-wasip1/release" / file_name):
        if candidate.is_file():
            return candidate
    return None
