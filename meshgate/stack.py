"""`meshgate up`: the whole local stack in the foreground, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from meshgate.demo import echo_app
from meshgate.envoy import EnvoyProcess
from meshgate.xds.bootstrap import envoy_bootstrap
from meshgate.xds.config import MeshConfig
from meshgate.xds.server import ControlServer, ServerAddress

log = logging.getLogger("meshgate.up")


@dataclass
class StackPorts:
    xds: int = 18000
    http: int = 18001
    demo_upstream: int = 18080
    envoy_admin: int = 19901


async def run_stack(config: MeshConfig, config_path: Path | None, ports: StackPorts,
                    *, delta: bool = False) -> None:
    server = ControlServer(config, ServerAddress("127.0.0.1", ports.xds, ports.http), config_path)
    await server.start()
    upstream = web.AppRunner(echo_app("demo"), access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", ports.demo_upstream).start()
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-up-"))
    envoy = EnvoyProcess(
        envoy_bootstrap(node_id="envoy-0", node_cluster="envoy", xds_host="127.0.0.1",
                        xds_port=ports.xds, admin_port=ports.envoy_admin, delta=delta),
        workdir,
    )
    try:
        await envoy.start()
        await envoy.wait_ready()
        _print_endpoints(config, ports, envoy)
        await _until_signal()
    finally:
        print("\nstopping: envoy, demo upstream, control server")
        await envoy.stop()
        await upstream.cleanup()
        await server.stop()


def _print_endpoints(config: MeshConfig, ports: StackPorts, envoy: EnvoyProcess) -> None:
    print("meshgate is up (Ctrl-C stops everything):")
    print(f"  control server  xDS grpc://127.0.0.1:{ports.xds}  "
          f"status http://127.0.0.1:{ports.http}/status")
    print(f"  demo upstream   http://127.0.0.1:{ports.demo_upstream}")
    print(f"  envoy admin     http://127.0.0.1:{ports.envoy_admin}  (log: {envoy.log_path})")
    for listener in config.listeners:
        print(f"  envoy listener  {listener.name}: http://{listener.address}:{listener.port}/")
    print("  try: curl -s http://127.0.0.1:10000/api/hello ; meshgate status")


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
