"""Config model → Envoy v3 resources, for one kind of proxy.

Plain data in, plain protobuf messages out: no network, no state. Three audiences:

- Envoy and meshgate's sidecar get socket listeners with an HttpConnectionManager whose
  HTTP filters are the listener's plugins, fetched through ECDS (`config_discovery`), then
  the router.
- Proxyless gRPC clients (`xds:///name` targets) get API listeners for `grpc_services`
  with only the router filter: a gRPC client rejects an HTTP filter it does not know, so
  wasm filters are never sent to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    http_uri_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as wasm_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from meshgate.xds import resources as r
from meshgate.xds.config import Cluster, GrpcService, Listener, MeshConfig, Plugin, Route

PLUGIN_CLUSTER = "meshgate_plugins"
PLUGIN_RESOURCE_PREFIX = "meshgate.plugin."
WASM_RUNTIME = "envoy.wasm.runtime.v8"

Resources = dict[str, dict[str, Message]]


@dataclass(frozen=True)
class PluginServer:
    """Where proxies download plugin binaries (the control server's HTTP port)."""

    host: str
    port: int

    def url(self, sha256: str) -> str:
        return f"http://{self.host}:{self.port}/plugins/{sha256}.wasm"


def plugin_resource_name(plugin_name: str) -> str:
    return PLUGIN_RESOURCE_PREFIX + plugin_name


def route_config_name(listener_name: str) -> str:
    return f"{listener_name}.routes"


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def for_proxy(
    config: MeshConfig, plugin_server: PluginServer, *, node_id: str, node_cluster: str
) -> Resources:
    """Everything an Envoy (or meshgate sidecar) with this node identity should have."""
    selector = config.selector_for(node_id, node_cluster)
    chosen = [ls for ls in config.listeners if selector is None or ls.name in selector.listeners]
    ports = dict(selector.ports) if selector else {}
    plugin_names = sorted({name for ls in chosen for name in ls.plugins})
    out: Resources = {t: {} for t in r.PUSH_ORDER}
    for listener in chosen:
        out[r.LISTENER][listener.name] = _listener(listener, ports.get(listener.name), config)
        out[r.ROUTE][route_config_name(listener.name)] = _route_config(listener)
    for cluster in config.clusters:
        out[r.CLUSTER][cluster.name] = _cluster(cluster)
        out[r.ENDPOINT][cluster.name] = _load_assignment(cluster)
    if plugin_names:
        out[r.CLUSTER][PLUGIN_CLUSTER] = _plugin_cluster(plugin_server)
    for name in plugin_names:
        plugin = config.plugin(name)
        out[r.EXTENSION_CONFIG][plugin_resource_name(name)] = _plugin_extension(
            plugin, plugin_server
        )
    return out


def for_proxyless_grpc(config: MeshConfig) -> Resources:
    out: Resources = {t: {} for t in r.PUSH_ORDER}
    for service in config.grpc_services:
        out[r.LISTENER][service.name] = _api_listener(service)
        out[r.ROUTE][service.name] = _grpc_route_config(service)
    for cluster in config.clusters:
        out[r.CLUSTER][cluster.name] = _cluster(cluster)
        out[r.ENDPOINT][cluster.name] = _load_assignment(cluster)
    return out


def _router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=r.pack(router_pb2.Router())
    )


def _plugin_filter(plugin: Plugin) -> hcm_pb2.HttpFilter:
    """An ECDS reference whose default applies the plugin's failure policy.

    The default is used when the plugin's config never arrives (or is NACKed) before the
    initial fetch times out: fail-closed answers 503 like a failed plugin does in Envoy,
    fail-open passes requests through. Either way a missing plugin never becomes a 500
    for every request.
    """
    if plugin.fail_open:
        default = fault_pb2.HTTPFault()
    else:
        default = fault_pb2.HTTPFault(
            abort=fault_pb2.FaultAbort(
                http_status=503,
                percentage=percent_pb2.FractionalPercent(numerator=100),
            )
        )
    return hcm_pb2.HttpFilter(
        name=plugin_resource_name(plugin.name),
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=_ads(),
            default_config=r.pack(default),
            type_urls=[r.WASM_FILTER, r.FAULT_FILTER],
        ),
    )


def _listener(listener: Listener, port: int | None, config: MeshConfig) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=listener.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # A gateway's downstream is the client: append its address to x-forwarded-for,
        # as meshgate's sidecar does, so upstreams and plugins see who called.
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_config_name(listener.name)),
        http_filters=[_plugin_filter(config.plugin(p)) for p in listener.plugins]
        + [_router_filter()],
    )
    if listener.request_timeout_s is not None:
        manager.request_timeout.CopyFrom(r.duration(listener.request_timeout_s))
    if listener.request_headers_timeout_s is not None:
        manager.request_headers_timeout.CopyFrom(r.duration(listener.request_headers_timeout_s))
    return listener_pb2.Listener(
        name=listener.name,
        address=_socket_address(listener.address, port or listener.port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=r.pack(manager),
                    )
                ]
            )
        ],
    )


def _route(route: Route) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch(
        headers=[_header_matcher(h.name, h.exact, h.present) for h in route.headers]
    )
    if route.path is not None:
        match.path = route.path
    else:
        match.prefix = route.prefix or "/"
    action = route_components_pb2.RouteAction(cluster=route.cluster)
    if route.timeout_s is not None:
        action.timeout.CopyFrom(r.duration(route.timeout_s))
    if route.prefix_rewrite is not None:
        action.prefix_rewrite = route.prefix_rewrite
    return route_components_pb2.Route(name=route.name, match=match, route=action)


def _header_matcher(
    name: str, exact: str | None, present: bool | None
) -> route_components_pb2.HeaderMatcher:
    if exact is not None:
        return route_components_pb2.HeaderMatcher(
            name=name, string_match=string_pb2.StringMatcher(exact=exact)
        )
    return route_components_pb2.HeaderMatcher(name=name, present_match=present is not False)


def _route_config(listener: Listener) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=route_config_name(listener.name),
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=listener.name, domains=["*"], routes=[_route(x) for x in listener.routes]
            )
        ],
    )


_LB = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
    "random": cluster_pb2.Cluster.RANDOM,
}


def _cluster(cluster: Cluster) -> cluster_pb2.Cluster:
    out = cluster_pb2.Cluster(
        name=cluster.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=r.duration(cluster.connect_timeout_s),
        lb_policy=_LB[cluster.lb_policy],
    )
    if cluster.http2:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        out.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].CopyFrom(r.pack(options))
    return out


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _lb_endpoints(
    name: str, endpoints: list[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            # gRPC's xDS client ignores a locality without a weight.
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone="default"),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=_socket_address(host, port)
                        )
                    )
                    for host, port in endpoints
                ]
            )
        ],
    )


def _load_assignment(cluster: Cluster) -> endpoint_pb2.ClusterLoadAssignment:
    return _lb_endpoints(cluster.name, [(e.host, e.port) for e in cluster.endpoints])


def _plugin_cluster(server: PluginServer) -> cluster_pb2.Cluster:
    """A static cluster, so proxies can fetch plugin code before any EDS arrives."""
    return cluster_pb2.Cluster(
        name=PLUGIN_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=r.duration(2.0),
        load_assignment=_lb_endpoints(PLUGIN_CLUSTER, [(server.host, server.port)]),
    )


def _plugin_extension(plugin: Plugin, server: PluginServer) -> extension_pb2.TypedExtensionConfig:
    remote = base_pb2.RemoteDataSource(
        http_uri=http_uri_pb2.HttpUri(
            uri=server.url(plugin.sha256), cluster=PLUGIN_CLUSTER, timeout=r.duration(10.0)
        ),
        sha256=plugin.sha256,
        retry_policy=base_pb2.RetryPolicy(num_retries=wrappers_pb2.UInt32Value(value=5)),
    )
    plugin_config = wasm_pb2.PluginConfig(
        name=plugin.name,
        root_id=plugin.root_id,
        vm_config=wasm_pb2.VmConfig(
            vm_id=plugin.vm_id,
            runtime=WASM_RUNTIME,
            code=base_pb2.AsyncDataSource(remote=remote),
        ),
        configuration=r.pack(wrappers_pb2.StringValue(value=plugin.configuration)),
        failure_policy=wasm_pb2.FAIL_OPEN if plugin.fail_open else wasm_pb2.FAIL_CLOSED,
    )
    return extension_pb2.TypedExtensionConfig(
        name=plugin_resource_name(plugin.name),
        typed_config=r.pack(wasm_filter_pb2.Wasm(config=plugin_config)),
    )


def _api_listener(service: GrpcService) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=service.name,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=service.name),
        http_filters=[_router_filter()],
    )
    return listener_pb2.Listener(
        name=service.name,
        api_listener=api_listener_pb2.ApiListener(api_listener=r.pack(manager)),
    )


def _grpc_route_config(service: GrpcService) -> route_pb2.RouteConfiguration:
    action = route_components_pb2.RouteAction(cluster=service.cluster)
    if service.timeout_s is not None:
        action.max_stream_duration.max_stream_duration.CopyFrom(r.duration(service.timeout_s))
    return route_pb2.RouteConfiguration(
        name=service.name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=service.name,
                domains=[service.name],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=""), route=action
                    )
                ],
            )
        ],
    )
