"""Real control server → sidecar → real upstreams: routing and the data path's contract."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_sidecar_helpers import (
    mesh_config,
    running_sidecar,
    start_stack,
    upstreams,
)
from tests.support.ports import free_port


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "sotw"])
async def test_routes_balances_and_forwards_headers(tmp_path: Path, delta: bool) -> None:
    async with upstreams("a", "b", "api") as ports:
        port = free_port()
        config = mesh_config(
            port,
            [ports["a"], ports["b"]],
            routes=[
                {"name": "api", "prefix": "/api/", "cluster": "api", "prefix_rewrite": "/v1/"},
                {"name": "rest", "prefix": "/", "cluster": "web"},
            ],
        )
        config["clusters"].append({"name": "api", "endpoints": [f"127.0.0.1:{ports['api']}"]})
        stack = await start_stack(tmp_path, config)
        try:
            async with running_sidecar(stack, delta=delta), aiohttp.ClientSession() as client:
                base = f"http://127.0.0.1:{port}"
                seen = []
                for _ in range(4):
                    async with client.get(base + "/hello?x=1") as resp:
                        assert resp.status == 200
                        seen.append((await resp.json())["upstream"])
                assert sorted(seen) == ["a", "a", "b", "b"]  # round robin
                async with client.get(
                    base + "/api/items?q=1",
                    headers={"X-Forwarded-For": "10.0.0.1", "Connection": "keep-alive, x-drop",
                             "X-Drop": "secret", "traceparent":
                             "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
                ) as resp:  # fmt: skip
                    got = await resp.json()
                assert got["upstream"] == "api" and got["path"] == "/v1/items?q=1"
                assert got["headers"]["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
                assert got["headers"]["x-forwarded-proto"] == "http"
                assert len(got["headers"]["x-request-id"]) == 32
                assert "x-drop" not in got["headers"]
                # The sidecar's span continues the caller's trace.
                assert got["headers"]["traceparent"].startswith(
                    "00-0af7651916cd43dd8448eb211c80319c-"
                )
        finally:
            stack.__exit__(None, None, None)


async def test_errors_name_their_cause(tmp_path: Path) -> None:
    async with upstreams("a") as ports:
        port, dead = free_port(), free_port()
        config = mesh_config(
            port,
            [ports["a"]],
            routes=[
                {"name": "slow", "prefix": "/slow", "cluster": "web", "timeout": "0.3s"},
                {"name": "dead", "prefix": "/dead", "cluster": "dead"},
                {"name": "only", "path": "/exact", "cluster": "web"},
            ],
        )
        config["clusters"].append({"name": "dead", "endpoints": [f"127.0.0.1:{dead}"]})
        stack = await start_stack(tmp_path, config)
        try:
            async with running_sidecar(stack), aiohttp.ClientSession() as client:
                base = f"http://127.0.0.1:{port}"
                async with client.get(base + "/slow?delay=2") as resp:
                    assert (resp.status, resp.headers["x-meshgate-error"]) == (
                        504,
                        "upstream_timeout",
                    )
                async with client.get(base + "/dead") as resp:
                    assert resp.status == 503
                    assert resp.headers["x-meshgate-error"] == "upstream_connect_failure"
                async with client.get(base + "/nothing") as resp:
                    assert (resp.status, resp.headers["x-meshgate-error"]) == (404, "no_route")
                async with client.get(base + "/exact") as resp:
                    assert resp.status == 200
        finally:
            stack.__exit__(None, None, None)


async def test_streams_large_bodies_both_ways(tmp_path: Path) -> None:
    async with upstreams("a") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with running_sidecar(stack), aiohttp.ClientSession() as client:
                base = f"http://127.0.0.1:{port}"
                size = 8 * 1024 * 1024
                async with client.get(base + f"/?big={size}") as resp:
                    assert resp.status == 200
                    assert len(await resp.read()) == size

                async def chunks():  # type: ignore[no-untyped-def]
                    for _ in range(64):
                        yield b"y" * 65536

                async with client.post(base + "/upload", data=chunks()) as resp:
                    assert (await resp.json())["body_length"] == 64 * 65536
        finally:
            stack.__exit__(None, None, None)
