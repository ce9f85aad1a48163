"""The gRPC side of ADS: streams, their lifecycles, and who is connected.

Responses leave as bytes assembled by `snapshot.py` (the method handlers use an identity
serializer), so the protocol state machine in `protocol.py` never touches gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshgate.xds.cache import SnapshotCache, proxy_kind
from meshgate.xds.protocol import ProxyStream
from meshgate.xds.snapshot import SotwBodyCache

log = logging.getLogger("meshgate.xds")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass
class ConnectedProxy:
    node: base_pb2.Node
    flavour: str
    peer: str
    stream: ProxyStream
    connected_at: float = field(default_factory=time.time)

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node.id,
            "cluster": self.node.cluster,
            "user_agent": self.node.user_agent_name,
            "kind": proxy_kind(self.node),
            "xds": self.flavour,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "types": self.stream.type_status(),
        }


class AdsServer:
    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.bodies = SotwBodyCache()
        self.proxies: dict[int, ConnectedProxy] = {}
        self._ids = 0

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=bytes,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=bytes,
                ),
            },
        )

    # grpc.aio recognises streaming handlers by being async generator functions.
    async def sotw(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        async for response in self._serve(requests, context, delta=False):
            yield response

    async def delta(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        async for response in self._serve(requests, context, delta=True):
            yield response

    async def _serve(self, requests: AsyncIterator[Any], context: Any,
                     *, delta: bool) -> AsyncIterator[bytes]:
        events: asyncio.Queue[Any] = asyncio.Queue()
        reader = asyncio.create_task(_pump(requests, events))
        unsubscribe = self.cache.subscribe(lambda: events.put_nowait(None))
        stream: ProxyStream | None = None
        self._ids += 1
        stream_id = self._ids
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    break
                if event is None:
                    if stream is not None:
                        responses = stream.on_snapshot(self.cache.snapshot_for(
                            self.proxies[stream_id].node))
                    else:
                        continue
                else:
                    if stream is None:
                        stream = self._connect(stream_id, event, context, delta)
                    responses = stream.on_request(event)
                for response in responses:
                    yield response
        finally:
            reader.cancel()
            unsubscribe()
            gone = self.proxies.pop(stream_id, None)
            if gone is not None:
                log.info("proxy %s (%s) disconnected", gone.node.id, gone.flavour)

    def _connect(self, stream_id: int, first: Any, context: Any, delta: bool) -> ProxyStream:
        stream = ProxyStream(self.cache.snapshot_for(first.node), delta=delta, bodies=self.bodies)
        flavour = "delta" if delta else "sotw"
        self.proxies[stream_id] = ConnectedProxy(first.node, flavour, context.peer(), stream)
        log.info("proxy %s (cluster %s, %s, %s) connected", first.node.id, first.node.cluster,
                 first.node.user_agent_name or "unknown agent", flavour)
        return stream

    def status(self) -> list[dict[str, Any]]:
        return sorted((p.status() for p in self.proxies.values()),
                      key=lambda s: (s["node_id"], s["connected_at"]))


async def _pump(requests: AsyncIterator[Any], events: asyncio.Queue[Any]) -> None:
    try:
        async for request in requests:
            events.put_nowait(request)
        events.put_nowait(EOFError())
    except BaseException as exc:  # the stream ended or was cancelled: end the response side
        events.put_nowait(exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
