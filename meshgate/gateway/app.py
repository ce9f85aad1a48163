"""The sidecar process: xDS client, listeners, data path, plugins and admin, wired.

`Sidecar` is the xDS client's config sink: each accepted response yields a candidate
resource set, which becomes a new config snapshot once every reference in it resolved
(routes, endpoints, plugin binaries); a resource that cannot be applied raises, and the
client NACKs it with that message.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry import trace

from meshgate.gateway import resources as res
from meshgate.gateway.admin import admin_app
from meshgate.gateway.collector import DEFAULT_YOUNG_THRESHOLD, CollectorWatch
from meshgate.gateway.config import ConfigHolder, Incomplete, SidecarConfig, assemble
from meshgate.gateway.downstream import HeaderTimedServer
from meshgate.gateway.filters import PluginLoader, close_hosts
from meshgate.gateway.metrics import SidecarMetrics
from meshgate.gateway.proxy import DataPath, DataPathSettings
from meshgate.gateway.resources import UnsupportedConfig
from meshgate.gateway.tracing import sidecar_tracer_provider
from meshgate.gateway.upstream import SessionPool, close_later
from meshgate.gateway.xds_client import ResourceView, XdsClient

log = logging.getLogger("meshgate.sidecar")


@dataclass
class SidecarOptions:
    xds_target: str  # host:port of the control server's ADS
    node_id: str
    node_cluster: str = "meshgate-sidecar"
    delta: bool = True
    admin_host: str = "127.0.0.1"
    admin_port: int = 15000  # 0: any free port (see Sidecar.admin_port)
    drain_timeout_s: float = 10.0
    # Envoy's default max_request_headers_kb is 60: the same limit lets plugins see (and
    # answer) the same large headers, e.g. the auth plugin's 401 for an oversize token.
    max_request_header_bytes: int = 60 * 1024
    data_path: DataPathSettings = field(default_factory=DataPathSettings)
    tracer_provider: trace.TracerProvider | None = None  # None: see sidecar_tracer_provider
    # Python's young-generation gc threshold while the sidecar runs (0: the interpreter's;
    # decision 2200).
    gc_young_threshold: int = DEFAULT_YOUNG_THRESHOLD
    # Compiled plugin modules, kept across restarts (None: in memory only).
    module_cache_dir: Path | None = None


def default_module_cache() -> Path:
    """Where a sidecar keeps compiled plugin modules unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshgate" / "wasm-modules"


@dataclass
class _BoundListener:
    address: tuple[str, int]
    runner: web.ServerRunner


class Sidecar:
    def __init__(self, options: SidecarOptions) -> None:
        self.options = options
        self.metrics = SidecarMetrics()
        self.collector = CollectorWatch(self.metrics.registry, options.gc_young_threshold)
        self.holder = ConfigHolder()
        self.pool = SessionPool()
        provider = options.tracer_provider or sidecar_tracer_provider()
        self.data_path = DataPath(self.holder, self.metrics, options.data_path, provider)
        self.plugins = PluginLoader(self.holder, self.metrics.registry, options, provider)
        self.holder.on_drained = self._close_unused_plugins
        self.xds = XdsClient(
            options.xds_target,
            options.node_id,
            options.node_cluster,
            self,
            delta=options.delta,
            on_outcome=lambda t, o: self.metrics.xds_responses.labels(t, o).inc(),
        )
        self._listeners: dict[str, _BoundListener] = {}
        self._apply_lock = asyncio.Lock()
        self._version = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._xds_task: asyncio.Task[None] | None = None
        self._admin: web.AppRunner | None = None
        self.admin_port = 0
        self.draining = False
        self.ready_event = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.collector.install()
        self._admin = web.AppRunner(admin_app(self, self.metrics), access_log=None)
        await self._admin.setup()
        site = web.TCPSite(self._admin, self.options.admin_host, self.options.admin_port)
        await site.start()
        self.admin_port = self._admin.addresses[0][1]
        self._xds_task = asyncio.create_task(self.xds.run(), name="meshgate-sidecar-xds")
        log.info(
            "sidecar admin on %s:%d, xDS %s",
            self.options.admin_host,
            self.admin_port,
            self.options.xds_target,
        )

    async def stop(self) -> None:
        """Drain: refuse readiness, stop accepting, let requests in flight finish."""
        self.draining = True
        if self._xds_task is not None:
            self._xds_task.cancel()
            await asyncio.gather(self._xds_task, return_exceptions=True)
        await asyncio.gather(*(b.runner.cleanup() for b in self._listeners.values()))
        self._listeners.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()
        self.data_path.finishing.flush()  # the plugins' closing callbacks, before the hosts close
        await self.plugins.close()
        if self._admin is not None:
            await self._admin.cleanup()
        self.collector.close()

    @property
    def ready(self) -> bool:
        return self.holder.current is not None and not self.draining

    def listener_port(self, name: str) -> int:
        return self._listeners[name].runner.addresses[0][1]

    def config_dump(self) -> dict[str, Any]:
        current = self.holder.current
        return {
            "applied_version": current.version if current else 0,
            "listeners": {n: list(b.address) for n, b in self._listeners.items()},
            "xds": self.xds.status(),
            "resources": current.dump if current else {},
        }

    # ------------------------------------------------------------ config sink

    async def apply(self, view: ResourceView, changed_type: str) -> None:
        async with self._apply_lock:
            if changed_type == res.ECDS_TYPE:
                await self.plugins.load_all(view.of(res.ECDS_TYPE))
            try:
                config = assemble(view, self.pool, self.plugins.loaded(view), self._version + 1)
            except Incomplete as missing:
                log.info("config not complete yet: waiting for %s", missing)
                return
            await self._bind_listeners(config)
            self._version = config.version
            self.holder.swap(config)
            self.metrics.config_version.set(config.version)
            self.ready_event.set()
            log.info("applied config %d: listeners %s", config.version, sorted(config.listeners))
            # What a config built (protobufs, plugin hosts, modules) lives until the next
            # update: out of the collector's sight, a full collection under load no longer
            # walks it (a p99 of tens of ms on plugged requests before).
            gc.freeze()
            self._spawn(close_later(self.pool, self.holder.sessions_in_use(), 0))
            self._spawn(self._retire_later())
            self._close_unused_plugins()

    def _close_unused_plugins(self) -> None:
        """Close replaced plugin hosts once no request in flight runs through them."""
        unused = self.plugins.take_unused(self.holder.plugins_in_use())
        if unused:
            self._spawn(close_hosts(unused))

    async def _retire_later(self) -> None:
        """Close sessions and plugin VMs nobody uses once older snapshots drained."""
        for _ in range(int(self.options.drain_timeout_s * 10) + 1):
            if len(self.holder.sessions_in_use()) == len(
                {id(u.session) for u in self.holder.current.clusters.values()}  # type: ignore[union-attr]
            ):
                break
            await asyncio.sleep(0.1)
        await self.pool.retain(self.holder.sessions_in_use())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bind_listeners(self, config: SidecarConfig) -> None:
        wanted = {n: (lc.spec.address, lc.spec.port) for n, lc in config.listeners.items()}
        opened: list[str] = []
        try:
            for name, address in wanted.items():
                bound = self._listeners.get(name)
                if bound is None or bound.address != address:
                    await self._open(name, address)
                    opened.append(name)
        except UnsupportedConfig:
            for name in opened:
                self._spawn(self._listeners.pop(name).runner.cleanup())
            raise
        for name in set(self._listeners) - set(wanted):
            # Close after the swap's requests finish; cleanup() drains gracefully.
            self._spawn(self._listeners.pop(name).runner.cleanup())

    def _headers_timeout(self, listener: str) -> float | None:
        current = self.holder.current
        lc = current.listeners.get(listener) if current else None
        return lc.spec.request_headers_timeout_s if lc else None

    async def _open(self, name: str, address: tuple[str, int]) -> None:
        server = HeaderTimedServer(
            self.data_path.handler(name),
            headers_timeout=lambda: self._headers_timeout(name),
            # After a reply sent before the client's body ended, read and drop the rest
            # for up to 1 s, then close: Envoy's delayed_close_timeout (aiohttp's own
            # default is 10 s).
            lingering_time=1.0,
            access_log=None,
            auto_decompress=False,  # a proxy forwards the bytes it got
            max_line_size=self.options.max_request_header_bytes,
            max_field_size=self.options.max_request_header_bytes,
        )
        runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=self.options.drain_timeout_s
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, address[0], address[1], reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise UnsupportedConfig(
                f"listener '{name}': cannot bind {address[0]}:{address[1]}: {exc.strerror}"
            ) from exc
        old = self._listeners.get(name)
        self._listeners[name] = _BoundListener(address, runner)
        if old is not None:
            self._spawn(old.runner.cleanup())


async def run_sidecar(
    xds_target: str,
    node_id: str,
    node_cluster: str = "meshgate-sidecar",
    *,
    admin_host: str = "127.0.0.1",
    admin_port: int = 15000,
    delta: bool = True,
    drain_timeout_s: float = 10.0,
    gc_young_threshold: int = DEFAULT_YOUNG_THRESHOLD,
    module_cache_dir: Path | None = None,
) -> None:
    """Run a sidecar until SIGTERM or SIGINT, then drain and return."""
    sidecar = Sidecar(
        SidecarOptions(
            xds_target=xds_target,
            node_id=node_id,
            node_cluster=node_cluster,
            delta=delta,
            admin_host=admin_host,
            admin_port=admin_port,
            drain_timeout_s=drain_timeout_s,
            gc_young_threshold=gc_young_threshold,
            module_cache_dir=module_cache_dir,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    try:
        await stop.wait()
        log.info("draining (up to %.1fs)", drain_timeout_s)
    finally:
        await sidecar.stop()


def install_uvloop() -> bool:
    """Use uvloop when it is installed; the sidecar runs the same without it."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """`python -m meshgate.gateway.app --xds 127.0.0.1:18000 --node-id sidecar-0`."""
    parser = argparse.ArgumentParser(prog="meshgate sidecar", description=main.__doc__)
    parser.add_argument("--xds", required=True, help="control server ADS address, host:port")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--node-cluster", default="meshgate-sidecar")
    parser.add_argument("--admin-host", default="127.0.0.1")
    parser.add_argument("--admin-port", type=int, default=15000)
    parser.add_argument("--sotw", action="store_true", help="state-of-the-world, not delta")
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's own event loop")
    parser.add_argument("--gc-young-threshold", type=_count, default=DEFAULT_YOUNG_THRESHOLD,
                        help="Python's young-generation gc threshold (default "
                        f"{DEFAULT_YOUNG_THRESHOLD}; 0: the interpreter's, 700)")
    parser.add_argument("--module-cache", default=str(default_module_cache()), metavar="DIR",
                        help="compiled plugin modules, kept across restarts so a plugin "
                        "starts without compiling (default: %(default)s; empty: in memory "
                        "only). Native code this process runs: keep it private to the "
                        "sidecar's user")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if not args.no_uvloop:
        install_uvloop()
    asyncio.run(
        run_sidecar(
            args.xds,
            args.node_id,
            args.node_cluster,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
            delta=not args.sotw,
            drain_timeout_s=args.drain_timeout,
            gc_young_threshold=args.gc_young_threshold,
            module_cache_dir=Path(args.module_cache) if args.module_cache else None,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
