"""The sidecar's reading of Envoy resources: what it routes by, and what it refuses."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    health_check_pb2,
    http_uri_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as wasm_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from meshgate.gateway import resources as res
from meshgate.gateway.plugin_resources import decode_plugin


def pack(message) -> any_pb2.Any:  # type: ignore[no-untyped-def]
    out = any_pb2.Any()
    out.Pack(message)
    return out


def sock(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def plugin_filter(name: str) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name=name,
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            ),
            type_urls=[res.WASM_FILTER_TYPE],
        ),
    )


def router() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
    )


def listener(filters: list[hcm_pb2.HttpFilter], **hcm_extra) -> listener_pb2.Listener:  # type: ignore[no-untyped-def]
    hcm_extra.setdefault("use_remote_address", wrappers_pb2.BoolValue(value=True))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="ingress",
        rds=hcm_pb2.Rds(route_config_name="ingress.routes"),
        http_filters=filters,
        **hcm_extra,
    )
    return listener_pb2.Listener(
        name="ingress",
        address=sock("127.0.0.1", 15001),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="hcm", typed_config=pack(hcm))]
            )
        ],
    )


def test_listener_gives_address_route_name_and_plugins_in_order() -> None:
    decoded = res.decode_listener(
        listener(
            [plugin_filter("meshgate.plugin.auth"), plugin_filter("meshgate.plugin.rl"), router()]
        )
    )
    assert (decoded.address, decoded.port) == ("127.0.0.1", 15001)
    assert decoded.route_config_name == "ingress.routes"
    assert decoded.plugin_filters == ("meshgate.plugin.auth", "meshgate.plugin.rl")


def test_listener_timeouts_are_read_from_the_connection_manager() -> None:
    timed = res.decode_listener(listener(
        [router()], request_timeout=duration_pb2.Duration(seconds=30),
        request_headers_timeout=duration_pb2.Duration(nanos=500_000_000)))
    assert (timed.request_timeout_s, timed.request_headers_timeout_s) == (30.0, 0.5)
    plain = res.decode_listener(listener([router()]))
    assert (plain.request_timeout_s, plain.request_headers_timeout_s) == (None, None)


@pytest.mark.parametrize("field, value", [
    ("stream_idle_timeout", duration_pb2.Duration(seconds=5)),
    ("normalize_path", wrappers_pb2.BoolValue(value=True)),
    ("max_request_headers_kb", wrappers_pb2.UInt32Value(value=96)),
    ("xff_num_trusted_hops", 1),
])
def test_connection_manager_fields_the_sidecar_would_not_honour_are_refused(
        field: str, value: object) -> None:
    with pytest.raises(res.UnsupportedConfig, match=f"field '{field}' is not supported"):
        res.decode_listener(listener([router()], **{field: value}))


def test_connection_manager_settings_that_differ_from_what_the_sidecar_does() -> None:
    http2 = listener([router()], codec_type=hcm_pb2.HttpConnectionManager.HTTP2)
    with pytest.raises(res.UnsupportedConfig, match="codec_type HTTP2 is not supported"):
        res.decode_listener(http2)
    for unset_or_false in ({"use_remote_address": wrappers_pb2.BoolValue(value=False)},
                           {"use_remote_address": None}):
        with pytest.raises(res.UnsupportedConfig, match="use_remote_address must be true"):
            res.decode_listener(listener([router()], **unset_or_false))
    no_ids = listener([router()], generate_request_id=wrappers_pb2.BoolValue(value=False))
    with pytest.raises(res.UnsupportedConfig, match="generate_request_id false"):
        res.decode_listener(no_ids)
    http1 = listener([router()], codec_type=hcm_pb2.HttpConnectionManager.HTTP1,
                     generate_request_id=wrappers_pb2.BoolValue(value=True))
    assert res.decode_listener(http1).route_config_name == "ingress.routes"


def test_unsupported_http_filter_is_refused_with_its_name() -> None:
    lua = hcm_pb2.HttpFilter(name="envoy.filters.http.lua", typed_config=pack(struct_pb2.Struct()))
    with pytest.raises(res.UnsupportedConfig) as err:
        res.decode_listener(listener([lua, router()]))
    assert "listener 'ingress'" in str(err.value)
    assert "envoy.filters.http.lua" in str(err.value)


def test_router_must_be_last() -> None:
    with pytest.raises(res.UnsupportedConfig, match="last http filter"):
        res.decode_listener(listener([router(), plugin_filter("meshgate.plugin.auth")]))


def test_inline_route_config_is_refused() -> None:
    hcm = hcm_pb2.HttpConnectionManager(
        route_config=route_pb2.RouteConfiguration(name="x"), http_filters=[router()]
    )
    raw = listener([router()])
    raw.filter_chains[0].filters[0].typed_config.CopyFrom(pack(hcm))
    with pytest.raises(res.UnsupportedConfig, match="route_config"):
        res.decode_listener(raw)


def test_unknown_listener_field_is_named() -> None:
    raw = listener([router()])
    raw.per_connection_buffer_limit_bytes.value = 10
    with pytest.raises(res.UnsupportedConfig, match="per_connection_buffer_limit_bytes"):
        res.decode_listener(raw)


def route_config() -> route_pb2.RouteConfiguration:
    rc = route_components_pb2
    return route_pb2.RouteConfiguration(
        name="ingress.routes",
        virtual_hosts=[
            rc.VirtualHost(
                name="api",
                domains=["api.example.com"],
                routes=[
                    rc.Route(
                        name="v2",
                        match=rc.RouteMatch(
                            prefix="/v2/",
                            headers=[
                                rc.HeaderMatcher(
                                    name="X-Canary",
                                    string_match=string_pb2.StringMatcher(exact="1"),
                                )
                            ],
                        ),
                        route=rc.RouteAction(
                            cluster="canary",
                            prefix_rewrite="/",
                            timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000),
                        ),
                    ),
                    rc.Route(
                        name="health",
                        match=rc.RouteMatch(path="/health"),
                        route=rc.RouteAction(cluster="health"),
                    ),
                ],
            ),
            rc.VirtualHost(
                name="default",
                domains=["*"],
                routes=[
                    rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster="web"))
                ],
            ),
        ],
    )


def test_routes_match_host_prefix_headers_and_exact_path() -> None:
    table = res.decode_route_configuration(route_config())
    canary = table.select("api.example.com:8080", "/v2/items", {"x-canary": "1"})
    assert canary is not None and canary.cluster == "canary"
    assert canary.rewrite("/v2/items?a=1") == "/items?a=1"
    assert canary.timeout_s == 2.5
    # Envoy never falls back to another virtual host: no route there is a 404.
    assert table.select("api.example.com", "/v2/items", {}) is None
    assert table.select("api.example.com", "/health?x", {}).cluster == "health"  # type: ignore[union-attr]
    assert table.select("api.example.com", "/healthz", {}) is None
    assert table.select("other", "/v2/items", {"x-canary": "1"}).cluster == "web"  # type: ignore[union-attr]


def test_route_without_timeout_gets_envoys_default_and_zero_disables() -> None:
    raw = route_config()
    table = res.decode_route_configuration(raw)
    assert table.virtual_hosts[0].routes[1].timeout_s == res.DEFAULT_ROUTE_TIMEOUT_S
    raw.virtual_hosts[0].routes[1].route.timeout.CopyFrom(duration_pb2.Duration())
    assert res.decode_route_configuration(raw).virtual_hosts[0].routes[1].timeout_s is None


def test_redirect_and_regex_routes_are_refused() -> None:
    raw = route_config()
    raw.virtual_hosts[0].routes[1].redirect.path_redirect = "/x"
    with pytest.raises(res.UnsupportedConfig, match="'redirect' is not supported"):
        res.decode_route_configuration(raw)
    raw = route_config()
    raw.virtual_hosts[0].routes[1].match.safe_regex.regex = ".*"
    with pytest.raises(res.UnsupportedConfig, match="safe_regex"):
        res.decode_route_configuration(raw)


def test_retry_policy_is_refused_not_ignored() -> None:
    raw = route_config()
    raw.virtual_hosts[0].routes[0].route.retry_policy.num_retries.value = 3
    with pytest.raises(res.UnsupportedConfig, match="retry_policy"):
        res.decode_route_configuration(raw)


def test_eds_cluster_and_policies() -> None:
    raw = cluster_pb2.Cluster(
        name="web",
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(nanos=250_000_000),
    )
    decoded = res.decode_cluster(raw)
    assert (decoded.eds_service_name, decoded.connect_timeout_s) == ("web", 0.25)
    raw.lb_policy = cluster_pb2.Cluster.MAGLEV
    with pytest.raises(res.UnsupportedConfig, match="lb_policy MAGLEV"):
        res.decode_cluster(raw)
    raw.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    raw.type = cluster_pb2.Cluster.STRICT_DNS
    with pytest.raises(res.UnsupportedConfig, match="STRICT_DNS"):
        res.decode_cluster(raw)


def test_load_assignment_skips_unhealthy_endpoints() -> None:
    ec = endpoint_components_pb2
    raw = endpoint_pb2.ClusterLoadAssignment(
        cluster_name="web",
        endpoints=[
            ec.LocalityLbEndpoints(
                lb_endpoints=[
                    ec.LbEndpoint(endpoint=ec.Endpoint(address=sock("127.0.0.1", 9001))),
                    ec.LbEndpoint(
                        endpoint=ec.Endpoint(address=sock("127.0.0.1", 9002)),
                        health_status=health_check_pb2.UNHEALTHY,
                    ),
                ]
            )
        ],
    )
    assert res.decode_load_assignment(raw).endpoints == (res.Endpoint("127.0.0.1", 9001),)


def plugin_resource(
    sha: str = "ab" * 32, code_local: bool = False
) -> extension_pb2.TypedExtensionConfig:
    vm = wasm_pb2.VmConfig(vm_id="auth", runtime="envoy.wasm.runtime.v8")
    if code_local:
        vm.code.local.inline_bytes = b"\0asm"
    else:
        vm.code.remote.CopyFrom(
            base_pb2.RemoteDataSource(
                http_uri=http_uri_pb2.HttpUri(uri=f"http://127.0.0.1:1/plugins/{sha}.wasm"),
                sha256=sha,
            )
        )
    config = wasm_pb2.PluginConfig(
        name="auth",
        root_id="auth_root",
        vm_config=vm,
        configuration=pack(wrappers_pb2.StringValue(value='{"issuer":"me"}')),
        failure_policy=wasm_pb2.FAIL_OPEN,
    )
    return extension_pb2.TypedExtensionConfig(
        name="meshgate.plugin.auth", typed_config=pack(wasm_filter_pb2.Wasm(config=config))
    )


def test_plugin_resource_gives_url_sha_configuration_and_policy() -> None:
    plugin = decode_plugin(plugin_resource())
    assert plugin.name == "auth" and plugin.root_id == "auth_root" and plugin.vm_id == "auth"
    assert plugin.url.endswith(f"/plugins/{'ab' * 32}.wasm") and plugin.sha256 == "ab" * 32
    assert plugin.configuration == b'{"issuer":"me"}'
    assert plugin.fail_open is True


def test_plugin_with_inline_code_or_other_type_is_refused() -> None:
    with pytest.raises(res.UnsupportedConfig, match="must be remote"):
        decode_plugin(plugin_resource(code_local=True))
    other = extension_pb2.TypedExtensionConfig(
        name="meshgate.plugin.x", typed_config=pack(router_pb2.Router())
    )
    with pytest.raises(res.UnsupportedConfig, match="Router"):
        decode_plugin(other)


def test_virtual_host_choice_is_remembered_per_host_within_a_bound() -> None:
    vh = res.VirtualHost("any", ("*",), ())
    exact = res.VirtualHost("api", ("api.example.com",), ())
    table = res.RouteTable("r", (vh, exact))
    for i in range(3000):  # Host values come from clients: the memo must stay bounded
        table.select(f"h{i}.example.com", "/", {})
    assert len(table._by_host) <= 1024
    assert table._virtual_host("api.example.com") is exact
    table.select("API.example.com", "/", {})
    assert table._by_host["API.example.com"] is exact
