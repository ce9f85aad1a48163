"""The sidecar as an xDS client of the real control server: updates, NACKs, restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.integration.test_sidecar_helpers import (
    mesh_config,
    running_sidecar,
    start_stack,
    upstreams,
    wait_until,
)
from tests.support.ports import free_port


async def _hammer(url: str, stop: asyncio.Event, results: list[tuple[int, str]]) -> None:
    async with aiohttp.ClientSession() as client:
        while not stop.is_set():
            async with client.get(url) as resp:
                body = await resp.read()
                name = json.loads(body)["upstream"] if resp.status == 200 else body.decode()
                results.append((resp.status, name))


async def test_updates_under_load_fail_no_request(tmp_path: Path) -> None:
    async with upstreams("a", "b") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with running_sidecar(stack) as sidecar:
                stop, results = asyncio.Event(), []  # type: ignore[var-annotated]
                url = f"http://127.0.0.1:{port}/load"
                workers = [asyncio.create_task(_hammer(url, stop, results)) for _ in range(4)]
                for endpoints in ([ports["b"]], [ports["a"], ports["b"]], [ports["b"]]):
                    version = sidecar.holder.current.version  # type: ignore[union-attr]
                    await asyncio.to_thread(stack.update, mesh_config(port, endpoints), wait=False)
                    await wait_until(
                        lambda v=version: sidecar.holder.current.version > v,
                        20,
                        "the update",  # type: ignore[union-attr]
                    )
                    await asyncio.sleep(0.3)
                stop.set()
                await asyncio.gather(*workers)
        finally:
            stack.__exit__(None, None, None)
    assert len(results) > 50
    assert all(status == 200 for status, _ in results), {r for r in results if r[0] != 200}
    assert results[-1][1] == "b"  # the last update is what serves now


async def test_update_it_cannot_apply_is_nacked_and_last_good_keeps_serving(
    tmp_path: Path,
) -> None:
    async with upstreams("a", "b") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with running_sidecar(stack) as sidecar, aiohttp.ClientSession() as client:
                # Same endpoints (EDS is a separate resource, applied on its own, as in
                # Envoy); the cluster itself asks for HTTP/2, which the sidecar cannot do.
                bad = mesh_config(port, [ports["a"]])
                bad["clusters"][0]["http2"] = True
                await asyncio.to_thread(stack.update, bad, wait=False)
                cluster_state = lambda: sidecar.xds.status()["types"]["Cluster"]  # noqa: E731
                await wait_until(lambda: cluster_state()["last_nack"], 20, "a NACK")
                assert "HTTP/2" in cluster_state()["last_nack"]
                async with client.get(f"http://127.0.0.1:{port}/still") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["upstream"] == "a"
                # The control server sees the NACK and its reason, as `meshgate status` shows.
                proxy = await asyncio.to_thread(stack.proxy_status, "sidecar-0")
                assert "HTTP/2" in json.dumps(proxy)
                # A good update after a NACK applies.
                await asyncio.to_thread(stack.update, mesh_config(port, [ports["b"]]), wait=False)
                await wait_until(lambda: not cluster_state()["last_nack"], 20, "an ACK")
                async with client.get(f"http://127.0.0.1:{port}/now") as resp:
                    assert (await resp.json())["upstream"] == "b"
        finally:
            stack.__exit__(None, None, None)


async def test_keeps_serving_through_a_control_server_restart(tmp_path: Path) -> None:
    async with upstreams("a", "b") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with running_sidecar(stack) as sidecar, aiohttp.ClientSession() as client:
                await asyncio.to_thread(stack.stop_server)
                await wait_until(lambda: not sidecar.xds.connected, 10, "the stream to drop")
                async with client.get(f"http://127.0.0.1:{port}/during") as resp:
                    assert (await resp.json())["upstream"] == "a"
                await asyncio.to_thread(stack.start_server)
                await wait_until(lambda: sidecar.xds.connected, 30, "the reconnect")
                version = sidecar.holder.current.version  # type: ignore[union-attr]
                await asyncio.to_thread(stack.update, mesh_config(port, [ports["b"]]), wait=False)
                await wait_until(
                    lambda: sidecar.holder.current.version > version,
                    20,
                    "the update",  # type: ignore[union-attr]
                )
                async with client.get(f"http://127.0.0.1:{port}/after") as resp:
                    assert (await resp.json())["upstream"] == "b"
        finally:
            stack.__exit__(None, None, None)


async def test_admin_port_reports_health_readiness_metrics_and_config(tmp_path: Path) -> None:
    async with upstreams("a") as ports:
        port = free_port()
        stack = await start_stack(tmp_path, mesh_config(port, [ports["a"]]))
        try:
            async with running_sidecar(stack) as sidecar, aiohttp.ClientSession() as client:
                admin = f"http://127.0.0.1:{sidecar.admin_port}"
                trace_id = "0af7651916cd43dd8448eb211c80319c"
                parent = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
                async with client.get(f"http://127.0.0.1:{port}/x", headers=parent) as resp:
                    assert resp.status == 200
                async with client.get(admin + "/healthz") as resp:
                    assert resp.status == 200
                async with client.get(admin + "/readyz") as resp:
                    assert resp.status == 200
                accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
                async with client.get(admin + "/metrics", headers=accept) as resp:
                    text = await resp.text()
                assert 'meshgate_sidecar_requests_total{cluster="web",code="200"' in text
                # The latency histogram's exemplar is the client's trace: an SRE lands on it.
                assert f'# {{trace_id="{trace_id}"}}' in text
                async with client.get(admin + "/config_dump") as resp:
                    dumped = await resp.json()
                assert dumped["resources"]["Listener"]["ingress"]["port"] == port
                assert dumped["xds"]["types"]["Cluster"]["last_nack"] == ""
        finally:
            stack.__exit__(None, None, None)
