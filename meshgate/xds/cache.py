"""Snapshots per kind of proxy, rebuilt when the config changes.

Proxies that get the same resources (same kind, same `nodes:` entry) share one snapshot,
so a fleet of a thousand identical Envoys costs one translation and one serialisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.config.core.v3 import base_pb2

from meshgate.xds import translate
from meshgate.xds.config import MeshConfig
from meshgate.xds.snapshot import Snapshot

PROXYLESS = "proxyless-grpc"
PROXY = "proxy"


def proxy_kind(node: base_pb2.Node) -> str:
    """gRPC's xDS clients name themselves `gRPC ...`; Envoy and meshgate's sidecar don't."""
    return PROXYLESS if "grpc" in node.user_agent_name.lower() else PROXY


class SnapshotCache:
    def __init__(self, config: MeshConfig, plugin_server: translate.PluginServer) -> None:
        self.config = config
        self.plugin_server = plugin_server
        self.generation = 1
        self._snapshots: dict[Any, Snapshot] = {}
        self._listeners: list[Callable[[], None]] = []

    def snapshot_for(self, node: base_pb2.Node) -> Snapshot:
        kind = proxy_kind(node)
        if kind == PROXYLESS:
            key: Any = (PROXYLESS,)
        else:
            key = (PROXY, self.config.selector_for(node.id, node.cluster))
        snapshot = self._snapshots.get(key)
        if snapshot is None:
            snapshot = self._snapshots[key] = Snapshot.build(self._translate(node, kind))
        return snapshot

    def _translate(self, node: base_pb2.Node, kind: str) -> translate.Resources:
        if kind == PROXYLESS:
            return translate.for_proxyless_grpc(self.config)
        return translate.for_proxy(
            self.config, self.plugin_server, node_id=node.id, node_cluster=node.cluster
        )

    def set_config(self, config: MeshConfig) -> None:
        self.config = config
        self._snapshots = {}
        self.generation += 1
        for notify in list(self._listeners):
            notify()

    def subscribe(self, notify: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(notify)
        return lambda: self._listeners.remove(notify)
