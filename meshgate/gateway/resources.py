"""Envoy v3 resources → the sidecar's plain routing data.

The sidecar understands the subset of Envoy config that meshgate's control server
produces. Every decoder here either returns frozen plain data or raises
`UnsupportedConfig` naming the resource and the field it cannot honour, so a response
is NACKed whole and never half-applied (xDS protocol: "ACK/NACK and resource type
instance version", envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol).

Fields that change nothing about how the sidecar routes (stat prefixes, codec choice,
DNS settings of an EDS cluster) are tolerated; any other field that is set is refused,
by listing what each message may carry rather than what it may not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ECDS_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
PLUGIN_PREFIX = "meshgate.plugin."

LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")

# Envoy's default route timeout when a route sets none.
DEFAULT_ROUTE_TIMEOUT_S = 15.0


class UnsupportedConfig(ValueError):
    """A resource the sidecar cannot apply; the message becomes the NACK's error_detail."""


def _check_fields(msg: Message, allowed: Iterable[str], where: str) -> None:
    allowed_set = set(allowed)
    for desc, _ in msg.ListFields():
        if desc.name not in allowed_set:
            raise UnsupportedConfig(f"{where}: field '{desc.name}' is not supported")


def _seconds(duration: Message) -> float:
    return duration.seconds + duration.nanos / 1e9  # type: ignore[attr-defined]


# ---------------------------------------------------------------- plain data


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # lower case
    kind: str  # exact | prefix | suffix | contains | present
    value: str = ""
    invert: bool = False

    def matches(self, headers: dict[str, str]) -> bool:
        actual = headers.get(self.name)
        if self.kind == "present":
            hit = actual is not None
        elif actual is None:
            hit = False
        elif self.kind == "exact":
            hit = actual == self.value
        elif self.kind == "prefix":
            hit = actual.startswith(self.value)
        elif self.kind == "suffix":
            hit = actual.endswith(self.value)
        else:
            hit = self.value in actual
        return hit != self.invert


@dataclass(frozen=True)
class Route:
    name: str
    cluster: str
    prefix: str | None = None
    path: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    timeout_s: float | None = DEFAULT_ROUTE_TIMEOUT_S  # None: no timeout
    prefix_rewrite: str | None = None

    def matches(self, path: str, headers: dict[str, str]) -> bool:
        if self.path is not None:
            if path.split("?", 1)[0] != self.path:
                return False
        elif self.prefix is not None and not path.startswith(self.prefix):
            return False
        return all(h.matches(headers) for h in self.headers)

    def rewrite(self, path: str) -> str:
        if self.prefix_rewrite is None:
            return path
        matched = self.prefix if self.prefix is not None else path.split("?", 1)[0]
        return self.prefix_rewrite + path[len(matched) :]


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


_VHOST_CACHE_MAX = 1024  # Host values are the client's: bound what they can make us keep


@dataclass(frozen=True)
class RouteTable:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    # The virtual host chosen per Host value: matching every domain of every virtual host
    # on each request showed in the sidecar's profile; a table lives as long as its config.
    _by_host: dict[str, VirtualHost | None] = field(default_factory=dict, compare=False,
                                                    repr=False)

    def select(self, host: str, path: str, headers: dict[str, str]) -> Route | None:
        cache = self._by_host
        try:
            vhost = cache[host]
        except KeyError:
            vhost = self._virtual_host(host.lower())
            if len(cache) >= _VHOST_CACHE_MAX:
                cache.clear()
            cache[host] = vhost
        if vhost is None:
            return None
        for route in vhost.routes:
            if route.matches(path, headers):
                return route
        return None

    def _virtual_host(self, host: str) -> VirtualHost | None:
        # Envoy's order: exact domain, then longest suffix wildcard, then longest prefix
        # wildcard, then "*". The host is tried with and without its port.
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        best: tuple[int, int, VirtualHost] | None = None
        for vh in self.virtual_hosts:
            for domain in vh.domains:
                rank = _domain_rank(domain, host, bare)
                if rank is not None and (best is None or rank > best[:2]):
                    best = (*rank, vh)
        return best[2] if best else None


def _domain_rank(domain: str, host: str, bare: str) -> tuple[int, int] | None:
    domain = domain.lower()
    if domain == "*":
        return (0, 0)
    if domain in (host, bare):
        return (3, len(domain))
    if domain.startswith("*") and (host.endswith(domain[1:]) or bare.endswith(domain[1:])):
        return (2, len(domain))
    if domain.endswith("*") and (host.startswith(domain[:-1]) or bare.startswith(domain[:-1])):
        return (1, len(domain))
    return None


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    route_config_name: str
    plugin_filters: tuple[str, ...] = ()  # ECDS resource names, in filter order
    request_timeout_s: float | None = None  # whole downstream request, as HCM's
    request_headers_timeout_s: float | None = None  # first byte to end of headers


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class Cluster:
    name: str
    connect_timeout_s: float
    eds_service_name: str
    lb_policy: str = "ROUND_ROBIN"
    static_endpoints: tuple[Endpoint, ...] | None = None  # STATIC clusters only


@dataclass(frozen=True)
class LoadAssignment:
    cluster_name: str
    endpoints: tuple[Endpoint, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- listeners


def decode_listener(raw: listener_pb2.Listener) -> Listener:
    where = f"listener '{raw.name}'"
    _check_fields(raw, {"name", "address", "filter_chains", "stat_prefix"}, where)
    sock = raw.address.socket_address
    if not raw.address.HasField("socket_address") or sock.protocol != 0:
        raise UnsupportedConfig(f"{where}: only TCP socket_address listeners are supported")
    if len(raw.filter_chains) != 1:
        raise UnsupportedConfig(
            f"{where}: exactly one filter chain is supported, got {len(raw.filter_chains)}"
        )
    chain = raw.filter_chains[0]
    _check_fields(chain, {"filters", "name"}, f"{where} filter chain")
    if len(chain.filters) != 1 or chain.filters[0].typed_config.type_url != HCM_TYPE:
        kinds = [f.typed_config.type_url or f.name for f in chain.filters]
        raise UnsupportedConfig(
            f"{where}: the filter chain must hold one HttpConnectionManager, got {kinds}"
        )
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    route_name, plugins = _decode_hcm(hcm, where)
    timeout = _seconds(hcm.request_timeout) if hcm.HasField("request_timeout") else None
    headers_timeout = (_seconds(hcm.request_headers_timeout)
                       if hcm.HasField("request_headers_timeout") else None)
    return Listener(raw.name, sock.address, sock.port_value, route_name, plugins,
                    timeout or None, headers_timeout or None)


# The connection manager fields the sidecar honours. Anything else (path normalisation,
# access logs, idle timeouts, header size limits, ...) would be accepted and not done,
# so it is NACKed with its name instead.
_HCM_FIELDS = {
    "codec_type", "stat_prefix", "rds", "http_filters", "use_remote_address",
    "generate_request_id", "request_timeout", "request_headers_timeout",
}  # fmt: skip
_HTTP1_CODECS = (hcm_pb2.HttpConnectionManager.AUTO, hcm_pb2.HttpConnectionManager.HTTP1)


def _decode_hcm(hcm: hcm_pb2.HttpConnectionManager, where: str) -> tuple[str, tuple[str, ...]]:
    where_hcm = f"{where} HttpConnectionManager"
    _check_fields(hcm, _HCM_FIELDS, where_hcm)
    if hcm.codec_type not in _HTTP1_CODECS:
        codec = hcm_pb2.HttpConnectionManager.CodecType.Name(hcm.codec_type)
        raise UnsupportedConfig(f"{where_hcm}: codec_type {codec} is not supported; the "
                                "sidecar speaks HTTP/1.1 (AUTO or HTTP1)")
    # What the sidecar always does, as Envoy does with these set: the client's address is
    # appended to x-forwarded-for (Envoy appends only with use_remote_address), and a
    # request without x-request-id gets one.
    if not hcm.use_remote_address.value:
        raise UnsupportedConfig(f"{where_hcm}: use_remote_address must be true; the sidecar "
                                "always appends the client's address to x-forwarded-for")
    if hcm.HasField("generate_request_id") and not hcm.generate_request_id.value:
        raise UnsupportedConfig(f"{where_hcm}: generate_request_id false is not supported; "
                                "the sidecar always sets x-request-id when it is missing")
    if not hcm.HasField("rds"):
        raise UnsupportedConfig(f"{where}: routes must come from RDS (rds.route_config_name)")
    filters = list(hcm.http_filters)
    if not filters or filters[-1].typed_config.type_url != ROUTER_TYPE:
        raise UnsupportedConfig(f"{where}: the last http filter must be envoy.filters.http.router")
    return hcm.rds.route_config_name, tuple(_plugin_name(f, where) for f in filters[:-1])


def _plugin_name(http_filter: hcm_pb2.HttpFilter, where: str) -> str:
    name = http_filter.name
    if not http_filter.HasField("config_discovery"):
        kind = http_filter.typed_config.type_url or "no typed_config"
        raise UnsupportedConfig(
            f"{where}: http filter '{name}' ({kind}) is not supported; only wasm plugins "
            "delivered by config_discovery (ECDS) and the router are"
        )
    # The control server also lists the fault filter, whose only use is as the
    # default_config Envoy applies before the plugin arrives; the sidecar instead waits
    # for the plugin before it applies a config, so only the wasm type matters here.
    urls = list(http_filter.config_discovery.type_urls)
    if WASM_FILTER_TYPE not in urls:
        raise UnsupportedConfig(
            f"{where}: http filter '{name}' discovers {urls}; only {WASM_FILTER_TYPE} is supported"
        )
    return name


# ---------------------------------------------------------------- routes


def decode_route_configuration(raw: route_pb2.RouteConfiguration) -> RouteTable:
    where = f"route configuration '{raw.name}'"
    _check_fields(raw, {"name", "virtual_hosts", "validate_clusters"}, where)
    return RouteTable(raw.name, tuple(_decode_vhost(vh, where) for vh in raw.virtual_hosts))


def _decode_vhost(raw: route_components_pb2.VirtualHost, where: str) -> VirtualHost:
    where = f"{where} virtual host '{raw.name}'"
    _check_fields(raw, {"name", "domains", "routes"}, where)
    routes = tuple(_decode_route(r, i, where) for i, r in enumerate(raw.routes))
    return VirtualHost(raw.name, tuple(raw.domains), routes)


def _decode_route(raw: route_components_pb2.Route, index: int, where: str) -> Route:
    where = f"{where} route '{raw.name or index}'"
    _check_fields(raw, {"name", "match", "route"}, where)
    if not raw.HasField("route"):
        raise UnsupportedConfig(f"{where}: only 'route' actions are supported")
    match, action = raw.match, raw.route
    _check_fields(match, {"prefix", "path", "headers"}, f"{where} match")
    _check_fields(action, {"cluster", "timeout", "prefix_rewrite"}, f"{where} action")
    if not action.cluster:
        raise UnsupportedConfig(f"{where}: the action must name a cluster")
    timeout: float | None = DEFAULT_ROUTE_TIMEOUT_S
    if action.HasField("timeout"):
        timeout = _seconds(action.timeout) or None  # 0 disables, as in Envoy
    return Route(
        name=raw.name or str(index),
        cluster=action.cluster,
        prefix=match.prefix if match.WhichOneof("path_specifier") == "prefix" else None,
        path=match.path if match.WhichOneof("path_specifier") == "path" else None,
        headers=tuple(_decode_header_match(h, where) for h in match.headers),
        timeout_s=timeout,
        prefix_rewrite=action.prefix_rewrite or None,
    )


def _decode_header_match(raw: route_components_pb2.HeaderMatcher, where: str) -> HeaderMatch:
    name, invert = raw.name.lower(), raw.invert_match
    kind = raw.WhichOneof("header_match_specifier")
    simple = {
        "exact_match": "exact",
        "prefix_match": "prefix",
        "suffix_match": "suffix",
        "contains_match": "contains",
    }
    if kind in simple:
        return HeaderMatch(name, simple[kind], getattr(raw, kind), invert)
    if kind == "present_match":
        return HeaderMatch(name, "present", invert=invert != (not raw.present_match))
    if kind == "string_match":
        sm = raw.string_match
        which = sm.WhichOneof("match_pattern")
        if which in ("exact", "prefix", "suffix", "contains") and not sm.ignore_case:
            return HeaderMatch(name, which, getattr(sm, which), invert)
    raise UnsupportedConfig(f"{where}: header matcher on '{name}' ({kind}) is not supported")


# ---------------------------------------------------------------- clusters


# dns_lookup_family and alt_stat_name change nothing for EDS and STATIC clusters (the only
# types the sidecar takes); buffer limits and load-balancing options it would not honour.
_CLUSTER_FIELDS = {
    "name", "type", "eds_cluster_config", "connect_timeout", "lb_policy",
    "load_assignment", "dns_lookup_family", "alt_stat_name",
    "typed_extension_protocol_options",
}  # fmt: skip


def decode_cluster(raw: cluster_pb2.Cluster) -> Cluster:
    where = f"cluster '{raw.name}'"
    _check_fields(raw, _CLUSTER_FIELDS, where)
    policy = cluster_pb2.Cluster.LbPolicy.Name(raw.lb_policy)
    if policy not in LB_POLICIES:
        raise UnsupportedConfig(
            f"{where}: lb_policy {policy} is not supported ({', '.join(LB_POLICIES)} are)"
        )
    timeout = _seconds(raw.connect_timeout) if raw.HasField("connect_timeout") else 5.0
    if "typed_extension_protocol_options" in {d.name for d, _ in raw.ListFields()}:
        raise UnsupportedConfig(f"{where}: upstream protocol options (HTTP/2) are not supported")
    if raw.type == cluster_pb2.Cluster.EDS:
        service = raw.eds_cluster_config.service_name or raw.name
        return Cluster(raw.name, timeout, service, policy)
    if raw.type == cluster_pb2.Cluster.STATIC:
        endpoints = decode_load_assignment(raw.load_assignment).endpoints
        return Cluster(raw.name, timeout, raw.name, policy, static_endpoints=endpoints)
    kind = cluster_pb2.Cluster.DiscoveryType.Name(raw.type)
    raise UnsupportedConfig(f"{where}: cluster type {kind} is not supported (EDS, STATIC are)")


def decode_load_assignment(raw: endpoint_pb2.ClusterLoadAssignment) -> LoadAssignment:
    where = f"load assignment '{raw.cluster_name}'"
    _check_fields(raw, {"cluster_name", "endpoints", "policy"}, where)
    found: list[Endpoint] = []
    for locality in raw.endpoints:
        for lb in locality.lb_endpoints:
            if not lb.HasField("endpoint"):
                raise UnsupportedConfig(f"{where}: only inline endpoints are supported")
            if lb.health_status in (2, 3, 4):  # UNHEALTHY, DRAINING, TIMEOUT
                continue
            sock = lb.endpoint.address.socket_address
            if not sock.address or not sock.port_value:
                raise UnsupportedConfig(f"{where}: endpoint without socket_address/port_value")
            found.append(Endpoint(sock.address, sock.port_value))
    return LoadAssignment(raw.cluster_name, tuple(found))
