"""Envoy v3 type URLs and helpers to pack resources; no config knowledge here."""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"

LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
EXTENSION_CONFIG = _PREFIX + "envoy.config.core.v3.TypedExtensionConfig"

WASM_FILTER = _PREFIX + "envoy.extensions.filters.http.wasm.v3.Wasm"
FAULT_FILTER = _PREFIX + "envoy.extensions.filters.http.fault.v3.HTTPFault"

#: Make-before-break order: a proxy learns clusters and their endpoints before the
#: listeners and routes that point at them, and plugin configs last (listeners wait for
#: them while warming).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, EXTENSION_CONFIG)

#: Types where a SotW response must carry every resource of the type ("full state"):
#: a resource missing from the response is deleted by the proxy.
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER})

SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS",
               EXTENSION_CONFIG: "ECDS"}


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def duration(seconds: float) -> Duration:
    whole = int(seconds)
    return Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))
