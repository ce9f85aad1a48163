"""The sidecar's ADS client: one stream to the control server, SotW or delta.

Protocol points this module handles (envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol):

- Listeners and clusters are wildcard subscriptions (the first request names nothing);
  routes, endpoints and plugins (ECDS) are subscribed by name, as the listeners and
  clusters that arrived reference them; a change of those names is a new request on the
  same type carrying the type's last version and nonce.
- Every response is ACKed (same nonce, the new version) or NACKed (same nonce, the last
  accepted version, `error_detail` saying why). A NACKed response changes nothing.
- In SotW a response for a type carries the whole set of that type; in delta it carries
  changed resources and names of removed ones, each resource with its own version, and a
  reconnecting client tells the server what it holds (`initial_resource_versions`).
- The stream may fail at any time: the client keeps its last good resources (the data
  path keeps serving them) and reconnects with capped exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from meshgate.gateway import plugin_resources, resources
from meshgate.gateway.resources import UnsupportedConfig

log = logging.getLogger("meshgate.sidecar.xds")

# Order matters on (re)connect: clusters before listeners, like Envoy, so the data path
# can warm clusters before a listener starts to use them.
WILDCARD_TYPES = (resources.CLUSTER_TYPE, resources.LISTENER_TYPE)
NAMED_TYPES = (resources.ENDPOINT_TYPE, resources.ROUTE_TYPE, resources.ECDS_TYPE)

_DECODERS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    resources.LISTENER_TYPE: (listener_pb2.Listener, resources.decode_listener),
    resources.ROUTE_TYPE: (route_pb2.RouteConfiguration, resources.decode_route_configuration),
    resources.CLUSTER_TYPE: (cluster_pb2.Cluster, resources.decode_cluster),
    resources.ENDPOINT_TYPE: (endpoint_pb2.ClusterLoadAssignment, resources.decode_load_assignment),
    resources.ECDS_TYPE: (extension_pb2.TypedExtensionConfig, plugin_resources.decode_plugin),
}


@dataclass
class TypeState:
    """What the client holds of one resource type."""

    resources: dict[str, Any] = field(default_factory=dict)  # name → decoded plain data
    versions: dict[str, str] = field(default_factory=dict)  # per resource (delta)
    version_info: str = ""  # last accepted SotW / system version
    nonce: str = ""
    last_error: str = ""


@dataclass(frozen=True)
class ResourceView:
    """The decoded resources of every type, as handed to the config sink."""

    by_type: dict[str, dict[str, Any]]

    def of(self, type_url: str) -> dict[str, Any]:
        return self.by_type.get(type_url, {})


class ConfigSink(Protocol):
    """Receives candidate resource sets; raising UnsupportedConfig NACKs the response."""

    async def apply(self, view: ResourceView, changed_type: str) -> None: ...


def decode_any(type_url: str, raw: any_pb2.Any) -> tuple[str, Any]:
    """Decode one resource; returns (its name, plain data)."""
    if raw.type_url != type_url:
        raise UnsupportedConfig(f"resource of type {raw.type_url} in a {type_url} response")
    message_type, decoder = _DECODERS[type_url]
    message = message_type()
    if not raw.Unpack(message):
        raise UnsupportedConfig(f"cannot decode a {type_url} resource")
    decoded = decoder(message)
    name = getattr(message, "name", "") or getattr(message, "cluster_name", "")
    return name, decoded


def wanted_names(view: ResourceView, type_url: str) -> set[str]:
    """The names the held listeners and clusters reference, for a named type."""
    if type_url == resources.ENDPOINT_TYPE:
        return {
            c.eds_service_name
            for c in view.of(resources.CLUSTER_TYPE).values()
            if c.static_endpoints is None
        }
    listeners = view.of(resources.LISTENER_TYPE).values()
    if type_url == resources.ROUTE_TYPE:
        return {lst.route_config_name for lst in listeners}
    return {name for lst in listeners for name in lst.plugin_filters}


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter; reset after a healthy stream."""

    initial_s: float = 0.25
    cap_s: float = 15.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)


class XdsClient:
    """Holds one ADS stream open for the lifetime of the sidecar."""

    def __init__(
        self,
        target: str,
        node_id: str,
        node_cluster: str,
        sink: ConfigSink,
        *,
        delta: bool = True,
        backoff: Backoff | None = None,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        self.target = target
        self.delta = delta
        self.node = base_pb2.Node(
            id=node_id, cluster=node_cluster, user_agent_name="meshgate-sidecar"
        )
        self._sink = sink
        self._backoff = backoff or Backoff()
        self._on_outcome = on_outcome or (lambda _type, _outcome: None)
        self.types: dict[str, TypeState] = {t: TypeState() for t in _DECODERS}
        self._subscribed: dict[str, set[str]] = {t: set() for t in NAMED_TYPES}
        self.connected = False
        self.responses_applied = 0

    def view(self) -> ResourceView:
        return ResourceView({t: dict(s.resources) for t, s in self.types.items()})

    async def run(self) -> None:
        """Stream, and reconnect forever; cancel the task to stop."""
        while True:
            try:
                await self._stream_once()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "ADS stream to %s failed: %s %s", self.target, exc.code(), exc.details()
                )
            except Exception:
                log.exception("ADS stream to %s failed", self.target)
            self.connected = False
            delay = self._backoff.next_delay()
            log.info("reconnecting to %s in %.2fs", self.target, delay)
            await asyncio.sleep(delay)

    async def _stream_once(self) -> None:
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        for type_url in WILDCARD_TYPES:
            outbox.put_nowait(self._initial_request(type_url, set()))
        for type_url, names in self._subscribed.items():
            if names:
                outbox.put_nowait(self._initial_request(type_url, names))
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            method = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
            call = method(_Outbox(outbox))
            try:
                # Connected means the stream is up, not that a response came: a delta
                # server answers a reconnect that already holds every version with nothing.
                await call.wait_for_connection()
                self.connected = True
                self._backoff.attempt = 0
                async for response in call:
                    await self._handle(response, outbox)
            finally:
                call.cancel()  # stops gRPC's task that reads our request iterator

    # ------------------------------------------------------------ requests

    def _initial_request(self, type_url: str, names: set[str]) -> Any:
        state = self.types[type_url]
        if self.delta:
            return discovery_pb2.DeltaDiscoveryRequest(
                node=self.node,
                type_url=type_url,
                resource_names_subscribe=sorted(names),
                initial_resource_versions=dict(state.versions),
            )
        return discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names=sorted(names),
            version_info=state.version_info,
        )

    def _reply(self, type_url: str, error: str | None) -> Any:
        state = self.types[type_url]
        detail = status_pb2.Status(code=3, message=error) if error else None
        if self.delta:
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, response_nonce=state.nonce, error_detail=detail
            )
        return discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            version_info=state.version_info,
            resource_names=sorted(self._subscribed.get(type_url, ())),
            response_nonce=state.nonce,
            error_detail=detail,
        )

    def _resubscribe(self, outbox: asyncio.Queue[Any]) -> None:
        view = self.view()
        for type_url in NAMED_TYPES:
            want, have = wanted_names(view, type_url), self._subscribed[type_url]
            if want == have:
                continue
            self._subscribed[type_url] = want
            self._forget(type_url, have - want)
            if self.delta:
                outbox.put_nowait(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=type_url,
                        resource_names_subscribe=sorted(want - have),
                        resource_names_unsubscribe=sorted(have - want),
                    )
                )
            else:
                outbox.put_nowait(self._reply(type_url, None))

    def _forget(self, type_url: str, names: set[str]) -> None:
        state = self.types[type_url]
        for name in names:
            state.resources.pop(name, None)
            state.versions.pop(name, None)

    # ------------------------------------------------------------ responses

    async def _handle(self, response: Any, outbox: asyncio.Queue[Any]) -> None:
        type_url = response.type_url
        if type_url not in self.types:
            log.warning("ignoring a response of unknown type %s", type_url)
            return
        state = self.types[type_url]
        state.nonce = response.nonce
        try:
            merged, versions = self._merge(type_url, response)
            candidate = self.view()
            candidate.by_type[type_url] = merged
            await self._sink.apply(candidate, type_url)
        except UnsupportedConfig as exc:
            state.last_error = str(exc)
            log.error("NACK %s nonce %s: %s", _short(type_url), response.nonce, exc)
            outbox.put_nowait(self._reply(type_url, str(exc)))
            self._on_outcome(_short(type_url), "nack")
            return
        state.resources, state.versions, state.last_error = merged, versions, ""
        state.version_info = response.system_version_info if self.delta else response.version_info
        self.responses_applied += 1
        log.info(
            "ACK %s version %s (%d resources)", _short(type_url), state.version_info, len(merged)
        )
        outbox.put_nowait(self._reply(type_url, None))
        self._on_outcome(_short(type_url), "ack")
        self._resubscribe(outbox)

    def _merge(self, type_url: str, response: Any) -> tuple[dict[str, Any], dict[str, str]]:
        state = self.types[type_url]
        if not self.delta:
            decoded = dict(decode_any(type_url, r) for r in response.resources)
            return decoded, {}
        merged, versions = dict(state.resources), dict(state.versions)
        for name in response.removed_resources:
            merged.pop(name, None)
            versions.pop(name, None)
        for res in response.resources:
            name, value = decode_any(type_url, res.resource)
            merged[res.name or name] = value
            versions[res.name or name] = res.version
        return merged, versions

    def status(self) -> dict[str, Any]:
        """For /config_dump: versions, nonces and the last NACK reason per type."""
        return {
            "target": self.target,
            "mode": "delta" if self.delta else "sotw",
            "connected": self.connected,
            "types": {
                _short(t): {
                    "version_info": s.version_info,
                    "resources": sorted(s.resources),
                    "versions": dict(s.versions),
                    "last_nack": s.last_error,
                }
                for t, s in self.types.items()
            },
        }


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class _Outbox:
    """The request side of the stream. A plain async iterator, not an async generator:
    gRPC closes it from another task when the stream fails, which an async generator
    suspended in `await` refuses ("aclose(): asynchronous generator is already running")."""

    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self._queue = queue

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        return await self._queue.get()
