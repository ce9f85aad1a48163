"""`meshgate up`: the whole local stack in the foreground, on loopback.

Control server and demo upstream run in this process; OPA, Envoy and the sidecar are
child processes, each logging to a file in one work directory that is printed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from meshgate.demo import echo_app
from meshgate.envoy import EnvoyProcess
from meshgate.processes import ChildProcess
from meshgate.xds.bootstrap import envoy_bootstrap
from meshgate.xds.config import MeshConfig
from meshgate.xds.server import ControlServer, ServerAddress

log = logging.getLogger("meshgate.up")


@dataclass
class StackPorts:
    xds: int = 18000
    http: int = 18001
    demo_upstream: int = 18080
    opa: int = 18181
    envoy_admin: int = 19901
    sidecar_admin: int = 15000


def find_opa() -> str:
    local = Path(".tools/opa")
    if local.exists():
        return str(local.resolve())
    found = shutil.which("opa")
    if found is None:
        raise FileNotFoundError("no opa binary: run `make setup` (builds OPA into .tools/)")
    return found


async def run_stack(config: MeshConfig, config_path: Path | None, ports: StackPorts,
                    *, delta: bool = False, policies: Path = Path("policies")) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-up-"))
    server = ControlServer(config, ServerAddress("127.0.0.1", ports.xds, ports.http), config_path)
    upstream = web.AppRunner(echo_app("demo"), access_log=None)
    opa = ChildProcess("opa", [find_opa(), "run", "--server", "--log-level", "error",
                               "--addr", f"127.0.0.1:{ports.opa}", str(policies)], workdir)
    sidecar = ChildProcess("sidecar", [
        sys.executable, "-m", "meshgate.cli", "sidecar", "--xds", f"127.0.0.1:{ports.xds}",
        "--node-id", "sidecar-0", "--node-cluster", "meshgate-sidecar",
        "--admin-port", str(ports.sidecar_admin)], workdir)
    envoy = EnvoyProcess(
        envoy_bootstrap(node_id="envoy-0", node_cluster="envoy", xds_host="127.0.0.1",
                        xds_port=ports.xds, admin_port=ports.envoy_admin, delta=delta),
        workdir,
    )
    try:
        await opa.start()
        await opa.wait_http(f"http://127.0.0.1:{ports.opa}/health")
        await server.start()
        await upstream.setup()
        await web.TCPSite(upstream, "127.0.0.1", ports.demo_upstream).start()
        await envoy.start()
        await sidecar.start()
        await envoy.wait_ready()
        await sidecar.wait_http(f"http://127.0.0.1:{ports.sidecar_admin}/readyz")
        _print_endpoints(config, ports, workdir)
        await _until_signal()
    finally:
        print("\nstopping: sidecar, envoy, demo upstream, control server, opa", flush=True)
        await sidecar.stop()
        await envoy.stop()
        await upstream.cleanup()
        await server.stop()
        await opa.stop()


def _print_endpoints(config: MeshConfig, ports: StackPorts, workdir: Path) -> None:
    sidecar_ports = {}
    for selector in config.nodes:
        if selector.node_cluster == "meshgate-sidecar":
            sidecar_ports = dict(selector.ports)
    print("meshgate is up (Ctrl-C stops everything); logs in", workdir)
    print(f"  control server  xDS 127.0.0.1:{ports.xds}  "
          f"status http://127.0.0.1:{ports.http}/status  (meshgate status)")
    print(f"  OPA             http://127.0.0.1:{ports.opa}  (policies/)")
    print(f"  demo upstream   http://127.0.0.1:{ports.demo_upstream}")
    print(f"  envoy admin     http://127.0.0.1:{ports.envoy_admin}")
    print(f"  sidecar admin   http://127.0.0.1:{ports.sidecar_admin}  "
          "(/healthz /readyz /metrics /config_dump)")
    for listener in config.listeners:
        print(f"  listener {listener.name}: envoy http://{listener.address}:{listener.port}/"
              f"  sidecar http://{listener.address}:"
              f"{sidecar_ports.get(listener.name, listener.port)}/")
    print("  try: curl -i -H 'x-api-key: demo-key' http://127.0.0.1:10000/api/hello")
    print(flush=True)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
