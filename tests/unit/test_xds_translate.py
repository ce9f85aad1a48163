from __future__ import annotations

from pathlib import Path

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import wrappers_pb2

from meshgate.xds import resources as r
from meshgate.xds import translate
from meshgate.xds.config import from_dict
from meshgate.xds.snapshot import Snapshot

SERVER = translate.PluginServer("127.0.0.1", 18001)


def config(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    (tmp_path / "rl.wasm").write_bytes(b"\0asm\x01\0\0\0")
    raw = {
        "listeners": [
            {"name": "ingress", "port": 10000, "plugins": ["rate-limit"],
             "routes": [{"prefix": "/api", "cluster": "web", "timeout": "2s",
                         "headers": [{"name": "X-Env", "exact": "canary"}]},
                        {"path": "/healthz", "cluster": "web"}]},
            {"name": "admin", "port": 10001, "routes": [{"prefix": "/", "cluster": "web"}]},
        ],
        "clusters": [{"name": "web", "endpoints": ["127.0.0.1:8080", "127.0.0.1:8081"]}],
        "plugins": [{"name": "rate-limit", "wasm": "rl.wasm", "config": {"rules": []},
                     "failure_policy": "fail_open"}],
        **extra,
    }
    return from_dict(raw, source="t", base_dir=tmp_path)


def hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    out = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(out)
    return out


def test_proxy_gets_listeners_routes_clusters_endpoints_and_plugins(tmp_path: Path) -> None:
    out = translate.for_proxy(config(tmp_path), SERVER, node_id="e", node_cluster="envoy")
    assert sorted(out[r.LISTENER]) == ["admin", "ingress"]
    assert sorted(out[r.ROUTE]) == ["admin.routes", "ingress.routes"]
    assert sorted(out[r.CLUSTER]) == ["meshgate_plugins", "web"]
    assert sorted(out[r.ENDPOINT]) == ["web"]
    assert list(out[r.EXTENSION_CONFIG]) == ["meshgate.plugin.rate-limit"]
    endpoints = out[r.ENDPOINT]["web"].endpoints[0].lb_endpoints
    assert [e.endpoint.address.socket_address.port_value for e in endpoints] == [8080, 8081]
    route = out[r.ROUTE]["ingress.routes"].virtual_hosts[0].routes[0]
    assert route.match.prefix == "/api" and route.route.timeout.seconds == 2
    assert route.match.headers[0].name == "x-env"
    assert out[r.ROUTE]["ingress.routes"].virtual_hosts[0].routes[1].match.path == "/healthz"


def test_plugin_filter_uses_ecds_with_failure_policy_default(tmp_path: Path) -> None:
    out = translate.for_proxy(config(tmp_path), SERVER, node_id="e", node_cluster="envoy")
    filters = hcm(out[r.LISTENER]["ingress"]).http_filters
    assert [f.name for f in filters] == ["meshgate.plugin.rate-limit", "envoy.filters.http.router"]
    discovery = filters[0].config_discovery
    assert discovery.config_source.HasField("ads")
    assert list(discovery.type_urls) == [r.WASM_FILTER, r.FAULT_FILTER]
    default = fault_pb2.HTTPFault()
    discovery.default_config.Unpack(default)
    assert not default.HasField("abort")  # fail-open: pass requests through
    wasm = wasm_pb2.Wasm()
    out[r.EXTENSION_CONFIG]["meshgate.plugin.rate-limit"].typed_config.Unpack(wasm)
    remote = wasm.config.vm_config.code.remote
    assert remote.http_uri.uri.startswith("http://127.0.0.1:18001/plugins/")
    assert remote.http_uri.cluster == "meshgate_plugins"
    assert remote.http_uri.uri.endswith(remote.sha256 + ".wasm")
    configuration = wrappers_pb2.StringValue()
    wasm.config.configuration.Unpack(configuration)
    assert configuration.value == '{"rules": []}'
    assert wasm.config.root_id == "rate-limit"


def test_nodes_select_listeners_and_override_ports(tmp_path: Path) -> None:
    mesh = config(tmp_path, nodes=[{"cluster": "sidecar", "listeners": ["ingress"],
                                   "ports": {"ingress": 20000}}])
    sidecar = translate.for_proxy(mesh, SERVER, node_id="s", node_cluster="sidecar")
    assert list(sidecar[r.LISTENER]) == ["ingress"]
    address = sidecar[r.LISTENER]["ingress"].address.socket_address
    assert address.port_value == 20000
    envoy = translate.for_proxy(mesh, SERVER, node_id="e", node_cluster="envoy")
    assert sorted(envoy[r.LISTENER]) == ["admin", "ingress"]


def test_proxyless_grpc_gets_api_listeners_without_wasm(tmp_path: Path) -> None:
    mesh = config(tmp_path, grpc_services=[{"name": "greeter", "cluster": "web"}])
    out = translate.for_proxyless_grpc(mesh)
    listener = out[r.LISTENER]["greeter"]
    assert listener.HasField("api_listener") and not out[r.EXTENSION_CONFIG]
    manager = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(manager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert out[r.ROUTE]["greeter"].virtual_hosts[0].domains == ["greeter"]


def test_versions_follow_content_only(tmp_path: Path) -> None:
    first = Snapshot.build(translate.for_proxy(config(tmp_path), SERVER, node_id="a",
                                               node_cluster="x"))
    again = Snapshot.build(translate.for_proxy(config(tmp_path), SERVER, node_id="b",
                                               node_cluster="y"))
    assert {t: {n: v.version for n, v in items.items()} for t, items in first.resources.items()} \
        == {t: {n: v.version for n, v in items.items()} for t, items in again.resources.items()}
    other = translate.PluginServer("127.0.0.1", 18002)
    moved = Snapshot.build(translate.for_proxy(config(tmp_path), other, node_id="a",
                                               node_cluster="x"))
    assert moved.of_type(r.CLUSTER)["web"].version == first.of_type(r.CLUSTER)["web"].version
    assert moved.of_type(r.CLUSTER)["meshgate_plugins"].version != \
        first.of_type(r.CLUSTER)["meshgate_plugins"].version


def test_listener_timeouts_reach_the_connection_manager(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    raw_listener = {"name": "timed", "port": 10002, "request_timeout": "30s",
                    "request_headers_timeout": "500ms",
                    "routes": [{"prefix": "/", "cluster": "web"}]}
    timed = from_dict({"listeners": [raw_listener],
                       "clusters": [{"name": "web", "endpoints": ["127.0.0.1:8080"]}]},
                      source="t", base_dir=tmp_path)
    manager = hcm(translate.for_proxy(timed, SERVER, node_id="e",
                                      node_cluster="envoy")[r.LISTENER]["timed"])
    assert manager.request_timeout.seconds == 30
    assert manager.request_headers_timeout.nanos == 500_000_000
    untimed = hcm(translate.for_proxy(cfg, SERVER, node_id="e",
                                      node_cluster="envoy")[r.LISTENER]["admin"])
    assert not untimed.HasField("request_headers_timeout")
