"""The xDS protocol state of one proxy's ADS stream: requests and snapshots in, response
bytes out. No gRPC here, so every subtlety is testable without a network.

Protocol reference: https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol

Subtleties handled, and where:

- ACK/NACK: a request echoing the latest nonce ACKs (`version_info`) or NACKs
  (`error_detail`). A NACK is recorded per proxy and type with the resources it covered and
  the content is not sent again until it changes: responses are only sent when what the
  proxy should have differs from what it was sent, so there is no resend loop.
- SotW stale nonces (not the latest one sent for the type) are ignored whole; in delta,
  subscription changes in a stale request still apply (`_on_delta`).
- Wildcard: LDS/CDS requests with no names (the legacy form) or with `*` subscribe to all.
- Resources requested before they exist are remembered and pushed when they appear.
- Reconnects: a SotW request whose `version_info` equals the version of what we would send
  gets no response; a delta request's `initial_resource_versions` seed what the proxy has.
- Make-before-break: clusters a config change removes stay in CDS/EDS until the proxy
  ACKs the listeners/routes/plugins that stop using them (`_retiring`), and pushes go in
  `PUSH_ORDER`. After a CDS push, EDS is re-sent on the next request (SotW) or
  re-subscription (delta), because warming clusters wait for an EDS response.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshgate.xds import resources as r
from meshgate.xds.snapshot import (
    MAX_RESPONSE_BYTES,
    Snapshot,
    SotwBodyCache,
    VersionedResource,
    delta_response,
    sotw_response,
    split_by_size,
    type_version,
)

_ROUTING_TYPES = (r.LISTENER, r.ROUTE, r.EXTENSION_CONFIG)
_INFLIGHT_LIMIT = 64


@dataclass
class NackRecord:
    version: str
    nonce: str
    message: str
    resources: list[str]
    at: float


@dataclass
class TypeState:
    """One resource type on one stream."""

    type_url: str
    subscribed: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the proxy has
    nonce: str = ""
    version_sent: str = ""
    version_acked: str = ""
    nack: NackRecord | None = None
    responses: int = 0
    force: bool = False
    inflight: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        if not self.version_sent:
            state = "NOT SENT"
        elif self.nack is not None and self.nack.version == self.version_sent:
            state = "NACKED"
        elif self.version_acked == self.version_sent:
            state = "ACKED"
        else:
            state = "SENT"
        out: dict[str, Any] = {
            "state": state,
            "version_sent": self.version_sent,
            "version_acked": self.version_acked,
            "responses": self.responses,
            "resources": sorted(self.sent),
        }
        if self.nack is not None:
            out["last_nack"] = {
                "version": self.nack.version,
                "error": self.nack.message,
                "resources": self.nack.resources,
                "at": self.nack.at,
            }
        return out


class ProxyStream:
    """Protocol state for one ADS stream, SotW or delta."""

    def __init__(self, snapshot: Snapshot, *, delta: bool, bodies: SotwBodyCache,
                 max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.snapshot = snapshot
        self.delta = delta
        self._bodies = bodies
        self._max_bytes = max_bytes
        self._types: dict[str, TypeState] = {}
        self._nonces = itertools.count(1)
        self._retiring: dict[str, dict[str, VersionedResource]] = {r.CLUSTER: {}, r.ENDPOINT: {}}
        self._awaiting: set[str] = set()
        self._hold_routing = False

    # -- inputs ---------------------------------------------------------------------------

    def on_request(self, request: Any) -> list[bytes]:
        out = self._on_delta(request) if self.delta else self._on_sotw(request)
        return out + self._release_routing()

    def on_snapshot(self, snapshot: Snapshot) -> list[bytes]:
        old = self.snapshot
        self.snapshot = snapshot
        self._awaiting = {t for t in _ROUTING_TYPES if self._would_change(t)}
        if self._awaiting:
            self._retire_removed(old, snapshot)
        out = self._push(r.CLUSTER)
        self._hold_routing = bool(out) and bool(self._awaiting)
        out += self._push(r.ENDPOINT)
        return out + self._release_routing()

    def _release_routing(self) -> list[bytes]:
        """Listeners, routes and plugins go out once the clusters they use are warm-able:
        CDS ACKed (or NACKed) and endpoints sent for every EDS cluster. Sent earlier, a
        route could point at a cluster still waiting for endpoints, and Envoy answers 503."""
        if self._hold_routing and not self._clusters_ready():
            return []
        self._hold_routing = False
        out: list[bytes] = []
        for type_url in _ROUTING_TYPES:
            out += self._push(type_url)
        return out

    def _clusters_ready(self) -> bool:
        cds = self._state(r.CLUSTER)
        nacked = cds.nack is not None and cds.nack.version == cds.version_sent
        if cds.version_acked != cds.version_sent and not nacked:
            return False
        eds = self._state(r.ENDPOINT)
        available = {**self._retiring[r.ENDPOINT], **self.snapshot.of_type(r.ENDPOINT)}
        return all(eds.sent.get(name) == available[name].version
                   for name in cds.sent if name in available)

    def type_status(self) -> dict[str, dict[str, Any]]:
        return {r.SHORT_NAMES.get(t, t): s.status() for t, s in sorted(self._types.items())
                if s.subscribed}

    # -- SotW -----------------------------------------------------------------------------

    def _on_sotw(self, request: discovery_pb2.DiscoveryRequest) -> list[bytes]:
        state = self._state(request.type_url)
        if request.response_nonce and request.response_nonce != state.nonce:
            return []
        first = not state.subscribed
        state.subscribed = True
        out: list[bytes] = []
        if request.response_nonce:
            if request.HasField("error_detail"):
                self._record_nack(state, state.version_sent, request.response_nonce,
                                  request.error_detail.message, sorted(state.sent))
            else:
                state.version_acked = request.version_info
                out += self._on_ack(state)
        names = set(request.resource_names)
        state.wildcard = "*" in names or (not names and request.type_url in r.FULL_STATE_TYPES)
        names.discard("*")
        state.names = names
        if first and request.version_info:
            desired = self._desired(state)
            if type_version(desired.values()) == request.version_info:
                state.sent = {n: v.version for n, v in desired.items()}
                state.version_sent = state.version_acked = request.version_info
                return out
        return out + self._push(request.type_url, initial=first)

    def _send_sotw(self, state: TypeState, desired: dict[str, VersionedResource]) -> list[bytes]:
        items = [desired[n] for n in sorted(desired)]
        version = type_version(items)
        if state.type_url in r.FULL_STATE_TYPES:
            chunks = [items]
        else:
            chunks = split_by_size(items, self._max_bytes)
        out = []
        for part, chunk in enumerate(chunks):
            body = self._bodies.body(state.type_url, version, chunk, part)
            state.nonce = self._next_nonce()
            out.append(sotw_response(body, state.nonce))
        state.sent = {n: v.version for n, v in desired.items()}
        state.version_sent = version
        return out

    # -- delta ----------------------------------------------------------------------------

    def _on_delta(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[bytes]:
        state = self._state(request.type_url)
        first = not state.subscribed
        state.subscribed = True
        out: list[bytes] = []
        if first:
            state.sent.update(request.initial_resource_versions)
        if request.response_nonce:
            out += self._delta_reply(state, request)
        subscribe = list(request.resource_names_subscribe)
        if first and not subscribe and request.type_url in r.FULL_STATE_TYPES:
            state.wildcard = True
        for name in subscribe:
            if name == "*":
                state.wildcard = True
                continue
            if not first and name in state.names:
                state.sent.pop(name, None)  # re-subscription: the proxy wants it again
            state.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
            else:
                state.names.discard(name)
                state.sent.pop(name, None)
        return out + self._push(request.type_url, initial=first)

    def _delta_reply(self, state: TypeState, request: Any) -> list[bytes]:
        entry = state.inflight.pop(request.response_nonce, None)
        if entry is None:
            return []
        version, names = entry
        if request.HasField("error_detail"):
            self._record_nack(state, version, request.response_nonce,
                              request.error_detail.message, names)
            return []
        if request.response_nonce == state.nonce:
            state.version_acked = version
            return self._on_ack(state)
        return []

    def _send_delta(self, state: TypeState, desired: dict[str, VersionedResource]) -> list[bytes]:
        changed = [v for n, v in sorted(desired.items()) if state.sent.get(n) != v.version]
        removed = sorted(n for n in state.sent if n not in desired
                         and (state.wildcard or n in state.names))
        for name in list(state.sent):
            if name not in desired:
                del state.sent[name]
        version = type_version(desired.values())
        if not changed and not removed:
            if desired and not state.version_sent:
                # A reconnect whose initial_resource_versions already match: nothing to
                # send, and the proxy demonstrably holds this version.
                state.version_sent = state.version_acked = version
            return []
        out = []
        for i, chunk in enumerate(split_by_size(changed, self._max_bytes)):
            state.nonce = self._next_nonce()
            gone = removed if i == 0 else []
            out.append(delta_response(state.type_url, version, chunk, gone, state.nonce))
            state.inflight[state.nonce] = (version, [v.name for v in chunk] + gone)
        while len(state.inflight) > _INFLIGHT_LIMIT:
            state.inflight.pop(next(iter(state.inflight)))
        state.sent.update({v.name: v.version for v in changed})
        state.version_sent = version
        return out

    # -- shared ---------------------------------------------------------------------------

    def _state(self, type_url: str) -> TypeState:
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = TypeState(type_url)
        return state

    def _next_nonce(self) -> str:
        return str(next(self._nonces))

    def _desired(self, state: TypeState) -> dict[str, VersionedResource]:
        available = dict(self._retiring.get(state.type_url, {}))
        available.update(self.snapshot.of_type(state.type_url))
        if state.wildcard:
            return available
        return {n: available[n] for n in state.names if n in available}

    def _would_change(self, type_url: str) -> bool:
        state = self._types.get(type_url)
        if state is None or not state.subscribed:
            return False
        desired = self._desired(state)
        return {n: v.version for n, v in desired.items()} != state.sent

    def _push(self, type_url: str, *, initial: bool = False) -> list[bytes]:
        state = self._types.get(type_url)
        if state is None or not state.subscribed:
            return []
        if self._hold_routing and type_url in _ROUTING_TYPES:
            return []
        desired = self._desired(state)
        if self.delta:
            out = self._send_delta(state, desired)
        else:
            unchanged = {n: v.version for n, v in desired.items()} == state.sent
            full_state = type_url in r.FULL_STATE_TYPES
            if unchanged and not (initial and full_state) and not (state.force and desired):
                return []
            state.force = False
            out = self._send_sotw(state, desired)
        state.responses += len(out)
        if out and type_url == r.CLUSTER and not self.delta:
            self._state(r.ENDPOINT).force = True
        return out

    def _retire_removed(self, old: Snapshot, new: Snapshot) -> None:
        for type_url in (r.CLUSTER, r.ENDPOINT):
            state = self._types.get(type_url)
            if state is None:
                continue
            current = new.of_type(type_url)
            previous = {**self._retiring[type_url], **old.of_type(type_url)}
            for name, version in state.sent.items():
                item = previous.get(name)
                if name not in current and item is not None and item.version == version:
                    self._retiring[type_url][name] = item

    def _on_ack(self, state: TypeState) -> list[bytes]:
        if state.type_url not in self._awaiting or state.version_acked != state.version_sent:
            return []
        self._awaiting.discard(state.type_url)
        if self._awaiting or not any(self._retiring.values()):
            return []
        for retiring in self._retiring.values():
            retiring.clear()
        return self._push(r.CLUSTER) + self._push(r.ENDPOINT)

    @staticmethod
    def _record_nack(state: TypeState, version: str, nonce: str, message: str,
                     names: list[str]) -> None:
        state.nack = NackRecord(version, nonce, message, names, time.time())
