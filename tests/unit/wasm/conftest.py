"""Fixtures: a HostServices per test and a loader for WAT test plugins."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from meshgate.gateway.wasm import HostServices, PluginHost, PluginSpec
from meshgate.gateway.wasm.context import StreamContext

Loader = Callable[..., Awaitable[PluginHost]]


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[HostServices]:
    svc = HostServices(module_cache_dir=tmp_path / "modules", callback_deadline_s=0.2)
    yield svc
    svc.close()


@pytest.fixture
async def load(services: HostServices) -> AsyncIterator[Loader]:
    hosts: list[PluginHost] = []

    async def _load(wat: str, name: str = "probe", **spec: Any) -> PluginHost:
        wasm = wasmtime.wat2wasm(wat)
        host = await PluginHost.create(PluginSpec(name, bytes(wasm), **spec), services)
        hosts.append(host)
        return host

    yield _load
    for h in hosts:
        await h.close()


def call_in(host: PluginHost, ctx: Any, name: str, *args: int) -> int:
    """Call host function ``name`` from inside the plugin, with ``ctx`` as the current
    context, through the plugin's ``call_<name>`` forwarder; return its status."""
    result = host._invoke(ctx, f"call_{name}", *args)
    assert result is not None
    return result


def new_stream_ctx(host: PluginHost) -> StreamContext:
    stream = host.new_stream()
    return stream.ctx
