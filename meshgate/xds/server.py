"""The control server: config → snapshots → ADS over gRPC, plugin binaries over HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from meshgate.xds.ads import AdsServer
from meshgate.xds.cache import SnapshotCache
from meshgate.xds.config import MeshConfig
from meshgate.xds.http_api import PluginStore, build_app
from meshgate.xds.translate import PluginServer
from meshgate.xds.watch import watch_config

log = logging.getLogger("meshgate.xds")

#: Streams carry whole snapshots; allow big ones without tripping gRPC's 4 MiB default on
#: the receiving side of our own clients (responses themselves are split below 4 MiB).
_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class ServerAddress:
    host: str = "127.0.0.1"
    xds_port: int = 18000
    http_port: int = 18001
    advertise_host: str = ""
    """The IP proxies use to fetch plugin binaries; the bind host when empty."""


class ControlServer:
    def __init__(self, config: MeshConfig, address: ServerAddress,
                 config_path: Path | None = None) -> None:
        self.address = address
        self.config_path = config_path
        self.plugins = PluginStore()
        self._store_plugins(config)
        self.cache = SnapshotCache(
            config, PluginServer(address.advertise_host or address.host, address.http_port)
        )
        self.ads = AdsServer(self.cache)
        self.last_rejected: dict[str, Any] | None = None
        self.applied_at = time.time()
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None

    def _store_plugins(self, config: MeshConfig) -> None:
        for plugin in config.plugins:
            self.plugins.add(plugin.sha256, plugin.wasm)

    def apply(self, config: MeshConfig) -> None:
        self._store_plugins(config)
        self.cache.set_config(config)
        self.applied_at = time.time()
        self.last_rejected = None
        log.info("config generation %d applied from %s", self.cache.generation, config.source)

    def reject(self, error: str) -> None:
        self.last_rejected = {"error": error, "at": time.time()}

    def status(self) -> dict[str, Any]:
        return {
            "config": {
                "source": self.cache.config.source,
                "generation": self.cache.generation,
                "applied_at": self.applied_at,
                "last_rejected": self.last_rejected,
            },
            "proxies": self.ads.status(),
        }

    async def start(self) -> None:
        self._grpc = grpc.aio.server(options=_GRPC_OPTIONS)
        self._grpc.add_generic_rpc_handlers((self.ads.handler(),))
        bound = self._grpc.add_insecure_port(f"{self.address.host}:{self.address.xds_port}")
        if bound == 0:
            raise OSError(f"cannot listen for xDS on {self.address.host}:{self.address.xds_port}")
        await self._grpc.start()
        self._runner = web.AppRunner(build_app(self.plugins, self.status), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address.host, self.address.http_port).start()
        if self.config_path is not None:
            self._watcher = asyncio.create_task(
                watch_config(self.config_path, self.cache.config, self.apply, self.reject)
            )
        log.info("xDS (ADS, SotW and delta) on %s:%d; plugins and status on http://%s:%d",
                 self.address.host, self.address.xds_port, self.address.host,
                 self.address.http_port)

    async def stop(self, grace: float = 1.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._runner is not None:
            await self._runner.cleanup()
