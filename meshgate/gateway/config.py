"""The sidecar's applied config: one immutable snapshot, swapped whole.

A request takes the snapshot current when it arrives and keeps it to the end, so an
update never changes the route, cluster or plugins under a request in flight. Each
snapshot counts its requests in flight, which tells when resources only older snapshots
used (upstream sessions) may be closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshgate.gateway import resources as res
from meshgate.gateway.upstream import SessionPool, UpstreamCluster
from meshgate.gateway.xds_client import ResourceView


@dataclass(frozen=True)
class ListenerConfig:
    spec: res.Listener
    routes: res.RouteTable
    plugins: tuple[Any, ...]  # loaded plugin hosts, in filter order


@dataclass(eq=False)
class SidecarConfig:
    version: int
    listeners: dict[str, ListenerConfig]
    clusters: dict[str, UpstreamCluster]
    dump: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0


class Incomplete(Exception):
    """A reference not yet delivered; the sidecar waits for it rather than NACKing."""


def assemble(
    view: ResourceView,
    pool: SessionPool,
    plugins: dict[str, Any],
    version: int,
) -> SidecarConfig:
    """Build a complete snapshot, or raise Incomplete naming what is still missing."""
    listeners = {
        name: _listener(spec, view, plugins) for name, spec in view.of(res.LISTENER_TYPE).items()
    }
    clusters = {
        name: _cluster(spec, view, pool) for name, spec in view.of(res.CLUSTER_TYPE).items()
    }
    for lc in listeners.values():
        for vh in lc.routes.virtual_hosts:
            for route in vh.routes:
                if route.cluster not in clusters:
                    raise Incomplete(f"cluster '{route.cluster}' (route '{route.name}')")
    return SidecarConfig(version, listeners, clusters, dump=_dump(view))


def _listener(spec: res.Listener, view: ResourceView, plugins: dict[str, Any]) -> ListenerConfig:
    routes = view.of(res.ROUTE_TYPE).get(spec.route_config_name)
    if routes is None:
        raise Incomplete(f"route configuration '{spec.route_config_name}'")
    missing = [p for p in spec.plugin_filters if p not in plugins]
    if missing:
        raise Incomplete(f"plugins {missing} of listener '{spec.name}'")
    return ListenerConfig(spec, routes, tuple(plugins[p] for p in spec.plugin_filters))


def _cluster(spec: res.Cluster, view: ResourceView, pool: SessionPool) -> UpstreamCluster:
    endpoints = spec.static_endpoints
    if endpoints is None:
        assignment = view.of(res.ENDPOINT_TYPE).get(spec.eds_service_name)
        if assignment is None:
            raise Incomplete(f"endpoints of cluster '{spec.name}'")
        endpoints = assignment.endpoints
    return UpstreamCluster(spec, endpoints, pool.get(spec))


def _dump(view: ResourceView) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(getattr(value, k)) for k in value.__dataclass_fields__}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return value

    return {
        type_url.rsplit(".", 1)[-1]: {name: plain(v) for name, v in items.items()}
        for type_url, items in view.by_type.items()
    }


class ConfigHolder:
    """The current snapshot plus the older ones still serving requests.

    `on_drained` is called when the last request of a replaced snapshot ends, so what
    only that snapshot used (plugin VMs with tick tasks) can be closed without waiting
    for a poll.
    """

    def __init__(self) -> None:
        self.current: SidecarConfig | None = None
        self._older: list[SidecarConfig] = []
        self.on_drained: Callable[[], None] | None = None

    def swap(self, config: SidecarConfig) -> None:
        if self.current is not None:
            self._older.append(self.current)
        self.current = config

    def release(self, config: SidecarConfig) -> None:
        """One request on `config` ended."""
        config.inflight -= 1
        if config.inflight == 0 and config is not self.current and self.on_drained:
            self.on_drained()

    def plugins_in_use(self) -> set[int]:
        """ids of the plugin hosts the current snapshot or a request in flight uses."""
        self._older = [c for c in self._older if c.inflight > 0]
        live = ([self.current] if self.current else []) + self._older
        return {id(p) for c in live for lc in c.listeners.values() for p in lc.plugins}

    def sessions_in_use(self) -> set[int]:
        self._older = [c for c in self._older if c.inflight > 0]
        live = ([self.current] if self.current else []) + self._older
        return {id(u.session) for c in live for u in c.clusters.values()}
